"""A grid job as submitit runs it (imported only by the slurm launcher: submitit is an optional extra)."""

from __future__ import annotations

import submitit


class SubmititJob(submitit.helpers.Checkpointable):
    """Runs ``OUT/jobs/NAME.job.json`` in a submitit worker. As a ``Checkpointable`` it is requeued
    when SLURM times it out or preempts it, and its unit then resumes from its last checkpoint."""

    def __init__(self, job_file: str, threads: int, finalize=None):
        self.job_file = job_file      # absolute path of the job's description
        self.threads = threads        # torch threads (= the CPUs each job was given)
        self.finalize = finalize      # the aggregate job's analysis, f() (None for every other job)

    def __call__(self) -> str:
        from train.ablation.job import run_job_file

        return run_job_file(self.job_file, threads=self.threads, finalize=self.finalize)
