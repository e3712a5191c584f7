"""Init specs: grammar, validation messages, and what each spec does to every tensor of a tiny UNet."""

from pathlib import Path

import pytest
import torch

from probe.core.edm import EDMDenoiser
from probe.core.errors import UserError
from probe.core.models import LoadedModel, build_unet, save_model
from train.initspec import (
    CATEGORIES,
    apply_init_spec,
    format_init_report,
    fresh_state,
    parse_init_spec,
    resolve_refs,
    select_tensors,
    validate_init_spec,
)

IO = ("conv_in", "conv_out", "time_embedding")

TABLE_ROWS = {  # docs/method.md §5, one spec per row
    "teacher": ["teacher"],
    "random": ["random"],
    "reinit:conv_in,conv_out,time_embedding": ["teacher", "reinit"],
    "keep:down_blocks.*": ["teacher", "keep"],
    "keep:up_blocks.*": ["teacher", "keep"],
    "keep:mid_block": ["teacher", "keep"],
    "shuffle": ["teacher", "shuffle"],
    "shuffle@7:down_blocks.*,mid_block": ["teacher", "shuffle"],
    "from:runs/band_teacher": ["from"],
    "from:@regressed": ["from"],
    "from:runs/band + reinit:conv_out ; shuffle@3": ["from", "reinit", "shuffle"],
}


def _teacher(seed=5, channels=1):
    torch.manual_seed(seed)
    return LoadedModel(Path("."), "teacher", EDMDenoiser(build_unet(8, channels, "test")))


@pytest.fixture(scope="module")
def teacher():
    return _teacher()


def _sd(denoiser):
    return denoiser.unet.state_dict()


def test_every_table_row_parses_and_round_trips():
    for spec, ops in TABLE_ROWS.items():
        parsed = parse_init_spec(spec)
        assert [t.op for t in parsed.terms] == ops, spec
        assert parse_init_spec(parsed.canonical()).canonical() == parsed.canonical()
    assert parse_init_spec("shuffle@7:down_blocks.*,mid_block").terms[1].seed == 7
    assert parse_init_spec("shuffle@7:down_blocks.*,mid_block").terms[1].patterns == ("down_blocks.*", "mid_block")
    assert parse_init_spec("from:@regressed").refs() == ["regressed"]


@pytest.mark.parametrize("spec, offending", [
    ("teachr", "'teachr'"),
    ("keep:", "'keep:'"),
    ("reinit:conv_in,,conv_out", "'reinit:conv_in,,conv_out'"),
    ("teacher+random", "'random'"),
    ("shuffle@x", "'shuffle@x'"),
    ("from:", "'from:'"),
    ("random:conv_in", "'random:conv_in'"),
    ("teacher++shuffle", "empty part"),
    ("from@3:x", "'from@3:x'"),
    ("", "empty init spec"),
])
def test_invalid_specs_name_the_offending_part(spec, offending):
    with pytest.raises(UserError) as err:
        parse_init_spec(spec)
    assert offending in str(err.value)


def test_validation_against_the_model_names_globs_refs_and_paths(teacher, tmp_path):
    names = list(teacher.unet.state_dict())
    with pytest.raises(UserError, match=r"'down_blcks\.\*' matches no module"):
        validate_init_spec("keep:mid_block,down_blcks.*", names)
    with pytest.raises(UserError, match="matches no module"):
        validate_init_spec("reinit:conv_act", names)  # a module without parameters selects nothing
    with pytest.raises(UserError, match="'@band'.*not a prerequisite"):
        validate_init_spec("from:@band", names, refs={"regressed": "x"})
    with pytest.raises(UserError, match="does not exist"):
        validate_init_spec(f"from:{tmp_path / 'nope'}", names)
    validate_init_spec("from:@band", names, refs={"band": tmp_path / "not-built-yet"})
    with pytest.raises(UserError, match="matches no module"):
        apply_init_spec("shuffle:nothing*", teacher)
    assert resolve_refs("from:@band+keep:mid_block", {"band": "a/b"}) == "from:a/b+keep:mid_block"


def test_teacher_and_random(teacher):
    state = torch.random.get_rng_state()
    t, rep_t = apply_init_spec("teacher", teacher, seed=3)
    r, rep_r = apply_init_spec("random", teacher, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    fresh = fresh_state(teacher.unet.config, 3)
    for name, w in teacher.unet.state_dict().items():
        assert torch.equal(_sd(t)[name], w)
        assert torch.equal(_sd(r)[name], fresh[name])
    assert any(not torch.equal(_sd(r)[n], w) for n, w in teacher.unet.state_dict().items())
    assert rep_t["categories"]["teacher"] == 1.0 and rep_r["categories"]["random"] == 1.0
    assert all(p.requires_grad for p in t.parameters()) and t.training
    # the copy is independent of the teacher
    with torch.no_grad():
        next(t.parameters()).add_(1.0)
    assert not torch.equal(next(t.parameters()), next(teacher.denoiser.parameters()))


def test_reinit_and_keep_copy_a_fresh_init_of_the_same_config(teacher):
    fresh = fresh_state(teacher.unet.config, 11)
    io = set(select_tensors(list(fresh), IO))
    d, _ = apply_init_spec("reinit:" + ",".join(IO), teacher, seed=11)
    for name, w in teacher.unet.state_dict().items():
        assert torch.equal(_sd(d)[name], fresh[name] if name in io else w), name
    assert {n.split(".")[0] for n in io} == set(IO)

    enc = set(select_tensors(list(fresh), ["down_blocks.*"]))
    d, _ = apply_init_spec("keep:down_blocks.*", teacher, seed=11)
    for name, w in teacher.unet.state_dict().items():
        assert torch.equal(_sd(d)[name], w if name in enc else fresh[name]), name
    # "@SEED" overrides the run seed for that term
    d7, _ = apply_init_spec("reinit@7:conv_in", teacher, seed=11)
    assert torch.equal(_sd(d7)["conv_in.weight"], fresh_state(teacher.unet.config, 7)["conv_in.weight"])


def test_shuffle_permutes_each_tensor(teacher):
    src = teacher.unet.state_dict()
    d, rep = apply_init_spec("shuffle:down_blocks.*,mid_block", teacher, seed=2)
    chosen = set(select_tensors(list(src), ["down_blocks.*", "mid_block"]))
    changed = 0
    for name, w in src.items():
        out = _sd(d)[name]
        if name not in chosen:
            assert torch.equal(out, w)
            continue
        assert out.shape == w.shape
        assert torch.equal(out.flatten().sort().values, w.flatten().sort().values)  # same values
        if w.numel() > 1 and w.flatten().unique().numel() > 1:
            changed += int(not torch.equal(out, w))
    assert changed == len([n for n in chosen if src[n].flatten().unique().numel() > 1])
    assert rep["sources"]["shuffled"]["tensors"] == len(chosen)
    again, _ = apply_init_spec("shuffle:down_blocks.*,mid_block", teacher, seed=2)
    other, _ = apply_init_spec("shuffle@9:down_blocks.*,mid_block", teacher, seed=2)
    assert all(torch.equal(_sd(again)[n], _sd(d)[n]) for n in src)
    assert any(not torch.equal(_sd(other)[n], _sd(d)[n]) for n in chosen)
    # a tensor's permutation does not depend on which other tensors are shuffled
    whole, _ = apply_init_spec("shuffle", teacher, seed=2)
    assert all(torch.equal(_sd(whole)[n], _sd(d)[n]) for n in chosen)


def test_report_counts_add_up(teacher):
    sd = teacher.unet.state_dict()
    d, rep = apply_init_spec("keep:down_blocks.*,mid_block+shuffle:mid_block+reinit:conv_in", teacher, seed=1)
    assert rep["total"] == {"tensors": len(sd), "parameters": sum(t.numel() for t in sd.values())}
    assert sum(v["tensors"] for v in rep["sources"].values()) == len(sd)
    assert sum(v["parameters"] for v in rep["sources"].values()) == rep["total"]["parameters"]
    assert sum(v["fraction"] for v in rep["sources"].values()) == pytest.approx(1.0)
    assert set(rep["categories"]) == set(CATEGORIES) and sum(rep["categories"].values()) == pytest.approx(1.0)
    for module, by_source in rep["modules"].items():
        expected = sum(t.numel() for n, t in sd.items() if n == module or n.startswith(module + "."))
        assert sum(by_source.values()) == expected, module
    assert set(rep["modules"]["mid_block"]) == {"shuffled"} and set(rep["modules"]["conv_in"]) == {"random"}
    assert set(rep["modules"]["down_blocks.0"]) == {"teacher"} and set(rep["modules"]["up_blocks.1"]) == {"random"}
    by_name = rep["tensor_sources"]
    assert by_name["conv_in.weight"] == "random" and by_name["down_blocks.0.resnets.0.conv1.weight"] == "teacher"
    text = format_init_report(rep)
    assert "shuffled" in text and "per top-level module" in text


def test_from_another_model(teacher, tmp_path):
    other = _teacher(seed=9)
    save_model(tmp_path / "band", other.denoiser, "teacher", "digits", extra={"sigma_range": [1.5, 4.0]})
    gen_dir = tmp_path / "gen"
    save_model(gen_dir, other.denoiser, "generator", "digits", sigma_init=80.0)
    d, rep = apply_init_spec(f"from:{tmp_path / 'band'}+reinit:conv_out", teacher, seed=4)
    fresh = fresh_state(teacher.unet.config, 4)
    for name, w in other.unet.state_dict().items():
        assert torch.equal(_sd(d)[name], fresh[name] if name.startswith("conv_out.") else w), name
    label = f"from:{tmp_path / 'band'}"
    assert rep["sources"][label]["tensors"] == len(other.unet.state_dict()) - 2
    assert rep["source_models"][label]["sigma_range"] == [1.5, 4.0]
    assert rep["categories"]["other"] > 0.9
    _, rep = apply_init_spec("from:@g", teacher, refs={"g": gen_dir}, sigma_init=2.5)
    assert any("sigma_init=80" in w for w in rep["warnings"])
    # another architecture: the mismatching tensor is named
    save_model(tmp_path / "rgb", _teacher(channels=3).denoiser, "teacher", "shapes")
    with pytest.raises(UserError, match=r"'conv_in\.weight' has shape \(8, 3, 3, 3\)"):
        apply_init_spec(f"from:{tmp_path / 'rgb'}", teacher)
    with pytest.raises(UserError, match="does not exist"):
        apply_init_spec(f"from:{tmp_path / 'missing'}", teacher)


def test_random_init_differs_from_a_teacher_initialised_with_the_same_seed():
    # a teacher trained with seed s starts from manual_seed(s); a random student must not
    t = _teacher(seed=0)
    den, _ = apply_init_spec("random", t, seed=0)
    assert not torch.equal(_sd(den)["conv_in.weight"], _sd(t.denoiser)["conv_in.weight"])
