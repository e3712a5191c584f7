"""Shared test set-up: one thread, quiet progress, one classifier cache for the whole session."""

import os

import pytest
import torch

torch.set_num_threads(1)  # tiny models: a second thread only helps on an idle core, hurts badly otherwise


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
