"""Feature extraction into the HDF5 store: contract layout, same noisy inputs, resume, refusals."""

import hashlib
import json
from datetime import datetime

import h5py
import numpy as np
import pytest
import torch

import probe
import probe.core.models
from probe.core.data import load_dataset
from probe.core.edm import SIGMA_DATA, SIGMA_MIN, EDMDenoiser
from probe.core.errors import UserError
from probe.core.models import build_unet, load_model, save_model
from probe.features.extract import ExtractConfig, extract, extract_features, sample_noise
from probe.features.hooks import FeatureHooks
from probe.features.store import FORMAT, FORMAT_VERSION, FeatureStore, check_aligned

SIGMAS = [0.0, 0.5, 2.0]
CONTRACT_ATTRS = {"format", "format_version", "complete", "model", "model_sha256", "dataset", "split",
                  "pooling", "noise_seed", "created_utc", "toolkit_version"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two teachers with different weights, a bare diffusers (DDPM) UNet, a one-step generator,
    and an RGB 16x16 teacher for the shapes data; all the tiny "test" UNet."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_model(root / "a", EDMDenoiser(build_unet(8, 1, "test")), "teacher", "digits")
    torch.manual_seed(1)
    save_model(root / "b", EDMDenoiser(build_unet(8, 1, "test")), "teacher", "digits")
    torch.manual_seed(2)
    build_unet(8, 1, "test").save_pretrained(root / "ddpm")
    torch.manual_seed(3)
    save_model(root / "gen", EDMDenoiser(build_unet(8, 1, "test")), "generator", "digits", sigma_init=2.5)
    torch.manual_seed(4)
    save_model(root / "rgb", EDMDenoiser(build_unet(16, 3, "test")), "teacher", "shapes")
    return root


def run(model_dir, out, **kw):
    kw = {"sigmas": SIGMAS, "n_samples": 40, "batch": 16, "device": "cpu", "progress": False, **kw}
    return extract_features(model_dir, "digits", out=out, **kw)


def file_digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def capture_unet_inputs(monkeypatch):
    """Record (sample, timestep) of every UNet call made by models that extraction loads."""
    calls = []

    def loading(path, device="cpu"):
        model = real_load(path, device)
        model.unet.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append(args[0].detach().clone()), with_kwargs=True)
        return model

    real_load = probe.core.models.load_model
    monkeypatch.setattr(probe.core.models, "load_model", loading)
    return calls


def inputs_by_sigma(calls, n_sigmas):
    """Drop the layer-tracing call (one zero image), regroup [batch0 s0, batch0 s1, ...] per sigma."""
    calls = [c for c in calls if not (c.shape[0] == 1 and not c.any())]
    return [torch.cat(calls[s::n_sigmas]) if calls[s::n_sigmas] else torch.empty(0) for s in range(n_sigmas)]


# ------------------------------------------------------------------------------------ layout
def test_contract_layout_with_plain_h5py(models, tmp_path):
    out = run(models / "a", tmp_path / "f.h5", layers=["default", "conv_in"])
    data = load_dataset("digits", "test")
    model = load_model(models / "a")
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
        assert CONTRACT_ATTRS <= set(attrs) and {"source", "args_json"} <= set(attrs)
        assert attrs["format"] == FORMAT and attrs["format_version"] == FORMAT_VERSION
        assert attrs["complete"] == True and attrs["rows_done"] == 40  # noqa: E712 (numpy bool)
        assert attrs["model_sha256"] == model.sha256() and attrs["model"] == str(models / "a")
        assert ((attrs["dataset"], attrs["split"], attrs["pooling"], attrs["noise_seed"])
                == ("digits", "test", "mean", 0))
        assert attrs["toolkit_version"] == probe.__version__ and attrs["source"] == "denoiser"
        datetime.strptime(attrs["created_utc"], "%Y-%m-%dT%H:%M:%SZ")
        assert json.loads(attrs["args_json"])["config"]["sigmas"] == SIGMAS
        assert f["sigmas"].dtype == np.float64 and list(f["sigmas"][()]) == SIGMAS
        assert f["labels"].dtype == np.int64 and (f["labels"][()] == data.labels[:40].numpy()).all()
        assert f["sample_ids"].dtype == np.int64 and (f["sample_ids"][()] == np.arange(40)).all()
        layers = list(f["features"])
        assert layers == ["conv_in", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
        for layer in layers:
            ds = f["features"][layer]
            raw = tuple(ds.attrs["raw_shape"])
            assert ds.dtype == np.float32 and ds.shape == (3, 40, raw[0]) and ds.attrs["pooling"] == "mean"
            assert ds.chunks == (1, 16, raw[0]) and ds.compression == "lzf"     # one chunk per sigma and batch
        stored = f["features/mid_block"][()]
    # the stored rows are the pooled block outputs of D(y + sigma eps; sigma)
    eps = sample_noise(0, np.arange(40), (1, 8, 8))
    with torch.no_grad(), FeatureHooks(model.unet, ["mid_block"], "mean") as hooks:
        for s, sigma in enumerate(SIGMAS):
            model.denoiser(data.images[:40] + sigma * eps, sigma)
            np.testing.assert_allclose(stored[s], hooks.take()["mid_block"].numpy(), rtol=1e-5, atol=1e-6)
    with FeatureStore.open(out) as store:
        assert store.layers == layers and store.source == "denoiser"


def test_factors_and_pooling_variants(models, tmp_path):
    kw = dict(layers=["down_blocks.0"], n_samples=24, batch=10, sigmas=[0.3])
    mean = extract_features(models / "rgb", "shapes", out=tmp_path / "m.h5", progress=False, **kw)
    flat = extract_features(models / "rgb", "shapes", out=tmp_path / "f.h5", progress=False, pooling="flatten",
                            dtype="float16", compression="gzip", **kw)
    avg = extract_features(models / "rgb", "shapes", out=tmp_path / "a.h5", progress=False, pooling="avg2", **kw)
    data = load_dataset("shapes", "test")
    with FeatureStore.open(mean) as m, FeatureStore.open(flat) as fl, FeatureStore.open(avg) as av:
        assert set(m.factors) == set(data.factors)
        for name, values in data.factors.items():
            assert (m.factors[name] == values[:24]).all()
        assert (m.labels == data.factors["shape"][:24]).all()
        raw = tuple(fl.layer_attrs("down_blocks.0")["raw_shape"])
        assert raw == (8, 8, 8) and fl.shape("down_blocks.0") == (1, 24, 512)
        maps = fl.load("down_blocks.0", 0).reshape(24, *raw)
        # mean pooling is the average of the flattened map (float16 storage: ~1e-3 relative)
        np.testing.assert_allclose(m.load("down_blocks.0", 0), maps.mean(axis=(2, 3)), rtol=2e-2, atol=2e-3)
        quads = maps.reshape(24, 8, 2, 4, 2, 4).mean(axis=(3, 5)).reshape(24, -1)
        np.testing.assert_allclose(av.load("down_blocks.0", 0), quads, rtol=2e-2, atol=2e-3)
    with h5py.File(flat) as f:
        assert f["features/down_blocks.0"].dtype == np.float16 and f["features/down_blocks.0"].compression == "gzip"


# ------------------------------------------------------------------------------------- noise
def test_noise_is_a_function_of_seed_and_sample_id_only():
    full = sample_noise(7, np.arange(50), (3, 5, 5))
    parts = torch.cat([sample_noise(7, np.arange(a, min(a + 13, 50)), (3, 5, 5)) for a in range(0, 50, 13)])
    assert torch.equal(full, parts)
    picked = np.array([3, 4, 9, 40, 41, 42])
    assert torch.equal(sample_noise(7, picked, (3, 5, 5)), full[picked])
    assert not torch.equal(sample_noise(8, np.arange(50), (3, 5, 5)), full)
    assert len({tuple(r.flatten()[:4].tolist()) for r in full}) == 50   # no two samples share a draw
    big = sample_noise(1, np.arange(400), (1, 16, 16)).double()        # 102400 values
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02
    assert abs(float((big ** 4).mean()) - 3) < 0.1                      # Gaussian kurtosis
    assert sample_noise(1, np.arange(3), (1, 3, 3)).shape == (3, 1, 3, 3)  # odd size: half a pair unused


def test_two_models_and_batch_sizes_see_the_same_noisy_inputs(models, tmp_path, monkeypatch):
    calls = capture_unet_inputs(monkeypatch)
    a = run(models / "a", tmp_path / "a.h5", batch=16)
    inputs_a = inputs_by_sigma(calls, len(SIGMAS))
    calls.clear()
    b = run(models / "b", tmp_path / "b.h5", batch=7)
    inputs_b = inputs_by_sigma(calls, len(SIGMAS))
    calls.clear()
    run(models / "ddpm", tmp_path / "d.h5", batch=40)
    inputs_d = inputs_by_sigma(calls, len(SIGMAS))
    y = load_dataset("digits", "test").images[:40]
    eps = sample_noise(0, np.arange(40), (1, 8, 8))
    for s, sigma in enumerate(SIGMAS):
        assert torch.equal(inputs_a[s], inputs_b[s])                     # bitwise, whatever the batching
        x = y + sigma * eps                          # EDM: the UNet sees c_in x, sigma floored at SIGMA_MIN
        torch.testing.assert_close(inputs_a[s], x / (max(sigma, SIGMA_MIN) ** 2 + SIGMA_DATA ** 2) ** 0.5)
        torch.testing.assert_close(inputs_d[s], x / (1 + sigma ** 2) ** 0.5)  # DDPM: x_t = x / sqrt(1 + s^2)
    with FeatureStore.open(a) as fa, FeatureStore.open(b) as fb:
        check_aligned(fa, fb)
        assert not np.allclose(fa.load("mid_block", 1), fb.load("mid_block", 1))  # different weights


def test_generation_source_uses_the_generators_own_input(models, tmp_path, monkeypatch):
    calls = capture_unet_inputs(monkeypatch)
    out = extract_features(models / "gen", source="generation", n_samples=12, batch=5, out=tmp_path / "g.h5",
                           device="cpu", progress=False)
    with FeatureStore.open(out) as f:
        assert list(f.sigmas) == [2.5] and (f.labels == -1).all() and f.source == "generation"
        assert f.shape("up_blocks.1") == (1, 12, 8)
    z = sample_noise(0, np.arange(12), (1, 8, 8))
    seen = inputs_by_sigma(calls, 1)[0]
    torch.testing.assert_close(seen, 2.5 * z / (2.5 ** 2 + SIGMA_DATA ** 2) ** 0.5)
    with pytest.raises(UserError, match="sigma_init"):
        extract_features(models / "gen", source="generation", n_samples=4, sigmas=[1.0], out=tmp_path / "x.h5")
    with pytest.raises(UserError, match="one-step generator"):
        extract_features(models / "a", source="generation", n_samples=4, out=tmp_path / "x.h5")


# ------------------------------------------------------------------------------------ resume
def test_resume_after_interruption_equals_uninterrupted(models, tmp_path, monkeypatch):
    whole = run(models / "a", tmp_path / "whole.h5", batch=8)
    part = run(models / "a", tmp_path / "part.h5", batch=8, stop_after_batches=2)
    with h5py.File(part) as f:
        assert f.attrs["complete"] == False and f.attrs["rows_done"] == 16  # noqa: E712
    with pytest.raises(UserError, match="incomplete"):
        FeatureStore.open(part)
    calls = capture_unet_inputs(monkeypatch)
    run(models / "a", tmp_path / "part.h5", batch=8)
    assert len(inputs_by_sigma(calls, 1)[0]) == 24 * len(SIGMAS)        # only the 3 missing batches ran
    with h5py.File(whole) as fw, h5py.File(part) as fp:
        assert fp.attrs["complete"] == True  # noqa: E712
        for layer in fw["features"]:
            assert np.array_equal(fw["features"][layer][()], fp["features"][layer][()])   # bitwise
    digest = file_digest(part)
    calls.clear()
    run(models / "a", tmp_path / "part.h5", batch=8)                     # complete: nothing to do
    assert file_digest(part) == digest and not inputs_by_sigma(calls, 1)[0].numel()


# ---------------------------------------------------------------------------------- refusals
def test_bad_layers_and_sigmas(models, tmp_path):
    with pytest.raises(UserError) as err:
        run(models / "a", tmp_path / "x.h5", layers=["mid_blocks"])
    assert "'mid_block'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown pattern 'up_block.\\*'.*'up_blocks"):
        run(models / "a", tmp_path / "x.h5", layers=["up_block.*"])
    with pytest.raises(UserError, match="empty"):
        run(models / "a", tmp_path / "x.h5", sigmas=[])
    with pytest.raises(UserError, match=">= 0"):
        run(models / "a", tmp_path / "x.h5", sigmas=[0.5, -1.0])
    with pytest.raises(UserError, match="exceeds"):
        run(models / "a", tmp_path / "x.h5", n_samples=10_000)
    with pytest.raises(UserError, match="does not exist"):
        run(tmp_path / "no_model", tmp_path / "x.h5")
    with pytest.raises(UserError, match="takes 3x16x16"):
        run(models / "rgb", tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_foreign_existing_files_are_left_untouched(models, tmp_path):
    ours = run(models / "a", tmp_path / "f.h5", n_samples=8)
    digest = file_digest(ours)
    with pytest.raises(UserError, match="another extraction .*model_sha256"):
        run(models / "b", ours, n_samples=8)
    with pytest.raises(UserError, match="another extraction .*sigmas"):
        run(models / "a", ours, n_samples=8, sigmas=[1.0])
    with pytest.raises(UserError, match="another extraction .*n_samples"):
        run(models / "a", ours, n_samples=9)
    assert file_digest(ours) == digest
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    for path in (text, other):
        before = file_digest(path)
        with pytest.raises(UserError, match="refusing"):
            run(models / "a", path, n_samples=8)
        assert file_digest(path) == before
    assert not list(tmp_path.glob(".*.tmp"))
    # an explicit overwrite replaces it
    run(models / "b", ours, n_samples=8, overwrite=True)
    with FeatureStore.open(ours) as f:
        assert f.attrs["model_sha256"] == load_model(models / "b").sha256()


def test_config_validation_before_loading(tmp_path):
    base = dict(model=str(tmp_path / "missing"), out=str(tmp_path / "x.h5"))
    for bad, match in [(dict(pooling="max"), "pooling"), (dict(dtype="int8"), "dtype"), (dict(batch=0), "batch"),
                       (dict(source="teacher"), "source"), (dict(n_samples=0), "n_samples"),
                       (dict(noise_seed=-1), "noise_seed"), (dict(compression="zstd"), "compression")]:
        with pytest.raises(UserError, match=match):
            extract(ExtractConfig(**base, **bad), progress=False)
    with pytest.raises(TypeError):
        extract_features(tmp_path / "missing", out=tmp_path / "x.h5", poolng="mean")
