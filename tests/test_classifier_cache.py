"""The metric classifier's lazy cache: any grad mode, any caller, atomic and consistent under a race."""

import hashlib
import json
import multiprocessing as mp

import numpy as np
import pytest
import torch
from filelock import FileLock, Timeout

import probe.core.data as data
from probe.core.data import load_dataset
from probe.quality.classifier import ClassifierConfig, classifier_entry, file_sha256, load_or_train_classifier

TINY = ClassifierConfig(width=8, feature_dim=16, steps=40, batch_size=32, lr=1e-2, seed=1)  # ~0.1 s


def _entry(cache_dir, config=TINY):
    _, weights_path, info_path, _ = classifier_entry("digits", config, cache_dir)
    return weights_path, info_path


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "enable_grad"])
def test_trains_under_any_grad_mode_and_restores_it(tmp_path, mode):
    # The teacher's end-of-run evaluation holds torch.no_grad(): a fresh cache used to fail there.
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "enable_grad": torch.enable_grad}[mode]
    with context():
        grad_before, inference_before = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        model, info = load_or_train_classifier("digits", TINY, cache_dir=tmp_path)
        assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == (grad_before, inference_before)
        again, info2 = load_or_train_classifier("digits", TINY, cache_dir=tmp_path)
    assert not info["cached"] and info2["cached"] and not model.training
    assert all(not p.is_inference() for p in again.parameters())  # usable outside inference mode too
    x = load_dataset("digits", "test").images[:16]
    assert torch.equal(model.features(x), again.features(x))
    assert info["test_accuracy"] > 0.2  # 40 steps learn something: better than the 0.1 of chance


def test_training_does_not_depend_on_the_callers_grad_mode(tmp_path):
    a, _ = load_or_train_classifier("digits", TINY, cache_dir=tmp_path / "a")
    with torch.no_grad():
        b, _ = load_or_train_classifier("digits", TINY, cache_dir=tmp_path / "b")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_info_vouches_for_the_weights_and_a_mismatch_retrains(tmp_path):
    _, info = load_or_train_classifier("digits", TINY, cache_dir=tmp_path)
    weights, meta = _entry(tmp_path)
    assert json.loads(meta.read_text())["weights_sha256"] == file_sha256(weights) == info["weights_sha256"]
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary file left
    good = weights.read_bytes()
    # a damaged weights file (same size, flipped bytes) is not trusted: it is trained again
    weights.write_bytes(good[:-64] + bytes(64))
    _, info2 = load_or_train_classifier("digits", TINY, cache_dir=tmp_path)
    assert not info2["cached"] and weights.read_bytes() == good
    # a torn pair (weights written, killed before the info was renamed) and garbage info: retrained
    meta.write_text("{not json")
    _, info3 = load_or_train_classifier("digits", TINY, cache_dir=tmp_path)
    assert not info3["cached"] and json.loads(meta.read_text())["weights_sha256"] == file_sha256(weights)
    meta.unlink()
    _, info4 = load_or_train_classifier("digits", TINY, cache_dir=tmp_path)
    assert not info4["cached"] and load_or_train_classifier("digits", TINY, cache_dir=tmp_path)[1]["cached"]


def _race_worker(cache_dir, barrier, queue):
    torch.set_num_threads(1)
    barrier.wait()  # both processes find an empty cache at the same moment
    with torch.no_grad():
        model, info = load_or_train_classifier("digits", RACE, cache_dir=cache_dir)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.state_dict().values())).hexdigest()
    queue.put((info["cached"], info["weights_sha256"], digest))  # plain values: tensors would need the sender alive


RACE = ClassifierConfig(width=4, feature_dim=8, steps=300, batch_size=16, seed=2)  # ~1 s: long enough to overlap


def test_two_processes_racing_for_an_empty_cache(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # one trained, the other waited on the lock and loaded that result: one valid entry, same weights
    assert sorted(r[0] for r in results) == [False, True]
    assert results[0][1] == results[1][1]
    assert results[0][2] == results[1][2]  # the loaded model has exactly the trained weights
    weights, meta = _entry(tmp_path, RACE)
    assert json.loads(meta.read_text())["weights_sha256"] == file_sha256(weights) == results[0][1]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".lock", ".safetensors"]


def test_dataset_download_holds_a_lock_on_the_data_root(tmp_path, monkeypatch):
    # torchvision downloads and unpacks in place: a second process must wait, not write beside it.
    seen = []

    class FakeMNIST:
        def __init__(self, root, train, download):
            try:  # another process (here: another lock handle) must not get the lock meanwhile
                FileLock(str(tmp_path / ".mnist.download.lock")).acquire(timeout=0)
                seen.append("free")
            except Timeout:
                seen.append("held")
            self.data = torch.zeros(4, 28, 28, dtype=torch.uint8)
            self.targets = torch.arange(4)

    class FakeTorchvision:
        class datasets:
            MNIST = FakeMNIST

    monkeypatch.setattr(data, "_torchvision_or_none", lambda: FakeTorchvision)
    ds = data.load_dataset("mnist", "test", root=tmp_path)
    assert seen == ["held"] and len(ds) == 4 and np.all(ds.labels.numpy() == np.arange(4))
    FileLock(str(tmp_path / ".mnist.download.lock")).acquire(timeout=0)  # released afterwards


def test_the_grids_classifier_job_finds_the_factor_head_entry_it_loaded(tmp_path, monkeypatch):
    # A grid on a data set with factors (scenes, shapes) failed at its first job: the job checked for a
    # label-only cache entry while the classifier it loaded or trained has factor heads in its key.
    import functools

    import probe.quality.classifier as classifier
    from train.ablation.run import run_unit, unit_state

    monkeypatch.setenv("ONESTEP_PROBE_CACHE", str(tmp_path))
    monkeypatch.setattr(classifier, "ClassifierConfig", functools.partial(ClassifierConfig, width=8, feature_dim=16,
                                                                          steps=20, batch_size=32))
    job = {"dataset": "shapes"}
    assert unit_state("classifier", job) == "missing"
    run_unit("classifier", job, say=lambda _: None)  # raised "returned before it finished" before the fix
    assert unit_state("classifier", job) == "done"
    _, weights_path, info_path, heads = classifier.classifier_entry("shapes")
    stored = [h["name"] for h in json.loads(info_path.read_text())["heads"]]
    assert heads and stored == [h["name"] for h in heads] and weights_path.exists()
    lines = []
    run_unit("classifier", job, say=lines.append)
    assert lines == ["finished before, skipped"]
