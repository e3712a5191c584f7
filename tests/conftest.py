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


class FakeEvaluator:
    """Stands in for probe.quality.metrics.QualityEvaluator, whose classifier is trained once per data
    set: "FD" = ``scale`` x mean |x| of the samples, the samples of every call kept in ``seen``."""

    scale = 1.0
    seen: list = []

    def __init__(self, dataset, n_samples, seed, progress):
        self.info = {"dataset": dataset}

    def evaluate(self, samples):
        type(self).seen.append(samples.clone())
        return {"fd": self.scale * float(samples.abs().mean()), "precision": 0.5, "recall": 0.5, "coverage": 0.5,
                "n": len(samples)}

    def floor(self):
        return {"fd": 0.0}

    def memorisation(self, samples):
        return {"nn_ratio_pixel": 1.0}


@pytest.fixture
def fake_evaluator(monkeypatch):
    """Installs a fresh FakeEvaluator subclass (own ``seen`` list; set ``scale`` on it) for one test."""
    import probe.quality.metrics

    fake = type("FakeEvaluator", (FakeEvaluator,), {"seen": []})
    monkeypatch.setattr(probe.quality.metrics, "QualityEvaluator", fake)
    return fake
