"""Shared test set-up: one thread, quiet progress, one classifier cache for the whole session."""

import os

import pytest
import torch

torch.set_num_threads(1)  # tiny models: a second thread only helps on an idle core, hurts badly otherwise


@pytest.fixture(autouse=True)
def _torch_global_state():
    """Every test starts with one torch thread and gradients on, whatever ran before it.

    umap-learn's numba threading layer sets OpenMP's thread count, which torch shares: after a UMAP
    test torch ran on 2 threads, and a later bitwise comparison (DDP vs one process) failed only in
    that order (found by the random-order run, seed 1658006760).
    """
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    # The sample-quality classifier is trained once per session and reused by every test.
    os.environ["ONESTEP_PROBE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A few-step EDM teacher on digits with the 'test' UNet preset, shared by tests."""
    from train.teacher import TeacherConfig, train_teacher

    out = tmp_path_factory.mktemp("teacher") / "run"
    return train_teacher(TeacherConfig(out=str(out), preset="test", steps=4, batch=16, checkpoint_every=2,
                                       eval_samples=0, sample_steps=2), progress=False)
