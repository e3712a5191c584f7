"""Hooks on named UNet modules: default selection, output shapes, tuple outputs, pooling, patterns."""

import pytest
import torch

from probe.core.edm import EDMDenoiser
from probe.core.errors import UserError
from probe.core.models import UNET_PRESETS, build_unet, load_model, save_model
from probe.features.hooks import (
    FeatureHooks,
    default_layers,
    list_layers,
    pool,
    pooled_dim,
    resolve_layers,
    to_numpy_per_layer,
    trace_modules,
)

RES, CH = 8, 1                       # digits-like 8x8 grey inputs
BOC = UNET_PRESETS["test"]["block_out_channels"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A toolkit teacher run dir, a bare diffusers UNet dir and a DDPMPipeline dir, same architecture."""
    from diffusers import DDPMPipeline, DDPMScheduler

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_model(root / "teacher", EDMDenoiser(build_unet(RES, CH, "test")), "teacher", "digits")
    torch.manual_seed(1)
    build_unet(RES, CH, "test").save_pretrained(root / "bare_unet")
    torch.manual_seed(2)
    DDPMPipeline(unet=build_unet(RES, CH, "test"), scheduler=DDPMScheduler()).save_pretrained(root / "pipeline")
    return root


def expected_shapes(res: int = RES, boc=BOC) -> dict:
    """Output (C, H, W) of each trunk block from diffusers' UNet2DModel definition: every level but
    the last halves the resolution at the end of its down block and doubles it in its up block."""
    levels = len(boc)
    shapes = {}
    for i, c in enumerate(boc):
        shapes[f"down_blocks.{i}"] = (c, res >> min(i + 1, levels - 1), res >> min(i + 1, levels - 1))
    low = res >> (levels - 1)
    shapes["mid_block"] = (boc[-1], low, low)
    for j, c in enumerate(reversed(boc)):
        side = res if j == levels - 1 else low << (j + 1)
        shapes[f"up_blocks.{j}"] = (c, side, side)
    shapes["conv_in"], shapes["conv_out"] = (boc[0], res, res), (CH, res, res)
    return shapes


def test_default_selection_in_execution_order_with_shapes(model_dirs):
    model = load_model(model_dirs / "teacher")
    rows = list_layers(model)
    defaults = [r.path for r in rows if r.default]
    assert defaults == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert defaults == default_layers(model.unet)
    by_path = {r.path: r for r in rows}
    for path, shape in expected_shapes().items():
        assert by_path[path].shape == shape, path
        assert by_path[path].extractable
    # registration order puts up_blocks before mid_block; the listing follows the forward pass
    order = [r.path for r in rows]
    assert order.index("conv_in") < order.index("down_blocks.0") < order.index("mid_block") < order.index("up_blocks.0")
    assert by_path["down_blocks"].shape is None and not by_path["down_blocks"].extractable


@pytest.mark.parametrize("name", ["bare_unet", "pipeline"])
def test_diffusers_directories_list_the_same_layers(model_dirs, name):
    model = load_model(model_dirs / name)
    assert model.kind == "diffusers"
    rows = {r.path: r.shape for r in list_layers(model, max_depth=2)}
    for path, shape in expected_shapes().items():
        assert rows[path] == shape
    assert all(len(p.split(".")) <= 2 for p in rows)


def test_down_block_tuple_output_keeps_hidden_states_after_downsampler(model_dirs):
    model = load_model(model_dirs / "teacher")
    raw = {}
    handle = model.unet.down_blocks[0].register_forward_hook(lambda m, a, out: raw.setdefault("out", out))
    x = torch.randn(3, CH, RES, RES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FeatureHooks(model.unet, ["down_blocks.0", "mid_block"], "flatten") as hooks:
        model.denoiser(x, 0.7)
        feats = hooks.take()
        raw_shapes = dict(hooks.raw_shapes)
    handle.remove()
    hidden, res_samples = raw["out"]
    assert isinstance(res_samples, tuple)
    assert torch.equal(hidden, res_samples[-1])            # the downsampler's output is the last skip
    assert hidden.shape[-1] == RES // 2
    assert torch.equal(feats["down_blocks.0"], hidden.flatten(1))
    assert raw_shapes["down_blocks.0"] == tuple(hidden.shape[1:])


def test_pooling_definitions():
    t = torch.randn(5, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    flat = pool(t, "flatten")
    assert flat.shape == (5, 96) and torch.equal(flat, t.reshape(5, -1))
    torch.testing.assert_close(pool(t, "mean"), t.mean(dim=(2, 3)))
    torch.testing.assert_close(pool(t, "avg1"), t.mean(dim=(2, 3)))
    torch.testing.assert_close(pool(t, "avg4"), flat)       # K = H: every pixel is its own cell
    quads = t.reshape(5, 6, 2, 2, 2, 2).mean(dim=(3, 5)).reshape(5, -1)
    torch.testing.assert_close(pool(t, "avg2"), quads)
    for p, d in [("mean", 6), ("flatten", 96), ("avg2", 24)]:
        assert pool(t, p).shape[1] == pooled_dim((6, 4, 4), p) == d
    assert pool(torch.ones(2, 7), "mean").shape == (2, 7)   # [B, D] outputs (time embedding) pass through
    for bad in ["max", "avg0", "avg", "avgx"]:
        with pytest.raises(UserError, match="pooling"):
            pool(t, bad)
    with pytest.raises(UserError, match="C, H, W"):
        pooled_dim((7,), "avg2")


def test_patterns_globs_and_close_matches(model_dirs):
    model = load_model(model_dirs / "teacher")
    order, shapes, calls = trace_modules(model)
    usable = {p for p in shapes if calls[p] == 1}
    unet = model.unet
    assert (resolve_layers(unet, ["up_blocks.?", "mid_block"], order, usable)
            == ["mid_block", "up_blocks.0", "up_blocks.1"])
    assert resolve_layers(unet, ["default", "conv_in", "conv_out"], order, usable)[::6] == ["conv_in", "conv_out"]
    assert resolve_layers(unet, [], order, usable) == default_layers(unet)
    # the shared SiLU of a resnet runs several times per forward: globs skip it, naming it is refused
    shared = "down_blocks.0.resnets.0.nonlinearity"
    assert calls[shared] > 1
    assert shared not in resolve_layers(unet, ["down_blocks.0.resnets.0.*"], order, usable)
    with pytest.raises(UserError, match="one call"):
        resolve_layers(unet, [shared], order, usable)
    with pytest.raises(UserError, match="one call"):
        resolve_layers(unet, ["down_blocks"], order, usable)   # a ModuleList returns nothing
    with pytest.raises(UserError) as err:
        resolve_layers(unet, ["down_block.0"], order, usable)
    assert "unknown layer 'down_block.0'" in str(err.value) and "'down_blocks.0'" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown pattern 'mid_blok\\*'.*'mid_block'"):
        resolve_layers(unet, ["mid_blok*"], order, usable)


def test_feature_hooks_collect_once_per_forward_and_stack(model_dirs):
    model = load_model(model_dirs / "teacher")
    layers = ["down_blocks.1", "up_blocks.1"]
    x = torch.randn(4, CH, RES, RES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), FeatureHooks(model.unet, layers, "mean") as hooks:
        per_sigma = []
        for sigma in (0.0, 1.5):
            model.denoiser(x, sigma)
            per_sigma.append(hooks.take())
        arrays = to_numpy_per_layer(per_sigma, layers)
        model.denoiser(x, 1.0)
        model.denoiser(x, 1.0)
        with pytest.raises(UserError, match="ran 2 times"):
            hooks.take()
    for layer in layers:
        assert arrays[layer].shape == (2, 4, expected_shapes()[layer][0])
        for s in range(2):
            assert (arrays[layer][s] == per_sigma[s][layer].numpy()).all()
    assert not model.unet.down_blocks[1]._forward_hooks       # removed on exit
