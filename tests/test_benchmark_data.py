"""The procedural ``scenes`` benchmark: deterministic, disjoint splits, factors that match the pixels,
fast to generate, and usable by the teacher, the evaluator's pool and feature extraction."""

import time

import numpy as np
import pytest
import torch

from probe.core.data import (
    DATASETS,
    SCENE_CLASSES,
    SCENE_COLOURS,
    SCENE_COUNT,
    SCENE_DESIGN_RICH,
    SCENE_MAX_DISTRACTORS,
    SCENE_SEEDS,
    generate_scenes,
    load_dataset,
)

# Foreground = a pixel whose brightest channel is above every background colour (<= 0.35) and
# below every object colour at its darkest when shade < 0.3 (>= 0.85 * 0.7), in [0, 1] units: about
# halfway between, so an edge pixel counts when about half of it is covered and areas are unbiased.
FOREGROUND = 0.5
# Area of each class's outline over size^2 (docs of _scene_sdf): circle pi, square 1.7^2, equilateral
# triangle of circumradius 1.25 (3 sqrt 3 / 4 * 1.25^2), cross of arm half-width 0.4 (2 * 2 * 0.8 - 0.8^2).
AREA_PER_SIZE2 = {"circle": np.pi, "square": 1.7 ** 2, "triangle": 3 * np.sqrt(3) / 4 * 1.25 ** 2,
                  "cross": 2 * 2 * 0.8 - 0.8 ** 2}


@pytest.fixture(scope="module")
def splits():
    return load_dataset("scenes", "train"), load_dataset("scenes", "test")


@pytest.fixture(scope="module")
def rich():
    """The rich design (rotation, shading, occluded distractors) as (images in [0, 1], factors)."""
    return generate_scenes(4000, seed=7, design=SCENE_DESIGN_RICH)


def test_listed_with_the_other_data_sets():
    assert "scenes" in DATASETS


def test_same_bytes_every_time(splits):
    train, _ = splits
    fresh, factors = generate_scenes(SCENE_COUNT["train"], SCENE_SEEDS["train"])  # not the per-process cache
    assert np.array_equal(train.images.numpy(), fresh * np.float32(2) - np.float32(1))  # [0, 1] -> [-1, 1]
    for name, values in factors.items():
        np.testing.assert_array_equal(train.factors[name], values, err_msg=name)
    again = load_dataset("scenes", "train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    # a caller editing its copy does not change what the next caller gets
    again.factors["size"][:] = 0
    assert load_dataset("scenes", "train").factors["size"].min() > 0


def test_shapes_dtypes_range_and_split_sizes(splits):
    for ds, split in zip(splits, ("train", "test")):
        assert ds.name == "scenes" and ds.split == split and len(ds) == SCENE_COUNT[split]
        assert ds.images.dtype == torch.float32 and tuple(ds.images.shape[1:]) == (3, 16, 16)
        assert ds.images.min() >= -1 and ds.images.max() <= 1
        assert ds.labels.dtype == torch.int64 and ds.num_classes == len(SCENE_CLASSES) == len(ds.class_names)
        counts = np.bincount(ds.labels.numpy(), minlength=ds.num_classes)
        assert counts.min() > 0.2 * len(ds)  # every class well represented (uniform draw: 0.25)


def test_splits_disjoint_by_construction(splits):
    train, test = splits
    seen = {row.tobytes() for row in train.images.numpy()}
    assert not any(row.tobytes() in seen for row in test.images.numpy())
    # and no image repeats within a split either: the held-out pool's resamples are distinct images
    assert len({row.tobytes() for row in test.images.numpy()}) == len(test)


def test_every_varying_factor_stored_with_its_kind(splits):
    for ds in splits:
        n = len(ds)
        assert np.array_equal(ds.factors["shape"], ds.labels.numpy())
        # the default design holds rotation, shading and distractors fixed: those are not stored
        assert set(ds.factors) == {"shape", "colour", "size", "x", "y", "background", "bg_angle"}
        for name, values in ds.factors.items():
            assert values.shape == (n,), name
            assert values.dtype in (np.int64, np.float32), name
            assert len(np.unique(values)) > 1, name  # every stored factor varies


def test_rich_design_stores_rotation_shading_and_occluded_distractors(rich):
    _, f = rich
    assert {"rotation", "shade", "n_objects", "d1_x", "d2_visible"} <= set(f)
    n_distractors = f["n_objects"] - 1
    assert set(np.unique(n_distractors)) == set(range(SCENE_MAX_DISTRACTORS + 1))
    for k in range(1, SCENE_MAX_DISTRACTORS + 1):
        present = n_distractors >= k
        for name in ("shape", "colour"):  # int factors: -1 exactly where the distractor is absent
            v = f[f"d{k}_{name}"]
            assert (v[~present] == -1).all() and (v[present] >= 0).all()
        for name in ("size", "x", "y", "visible"):  # float factors: NaN exactly there
            v = f[f"d{k}_{name}"]
            assert np.isnan(v[~present]).all() and np.isfinite(v[present]).all()
        visible = f[f"d{k}_visible"][present]
        assert visible.min() >= 0 and visible.max() <= 1 + 1e-6
        # occlusion varies: the main object hides some distractors mostly, leaves others whole
        assert (visible < 0.5).mean() > 0.1 and (visible > 0.99).mean() > 0.03
        # a distractor never has the main object's colour (it would merge with its outline)
        assert (f[f"d{k}_colour"][present] != f["colour"][present]).all()


def _foreground(ds) -> np.ndarray:
    return (((ds.images + 1) / 2).amax(1) > FOREGROUND).numpy()  # [N, H, W]


def test_class_size_and_position_match_the_pixels(splits):
    _, ds = splits
    f = ds.factors
    # the default design has no distractors and no shading: the foreground is the main object
    alone = np.ones(len(ds), bool)
    mask = _foreground(ds)
    area = mask.sum((1, 2))
    size2 = f["size"][alone] ** 2
    ratio = {}
    for k, name in enumerate(SCENE_CLASSES):
        m = f["shape"][alone] == k
        assert np.corrcoef(area[m], size2[m])[0, 1] > 0.9, name   # the size factor is real
        ratio[name] = float(np.median(area[m] / size2[m]))
        # the class's outline; 7%: the polygons' anti-aliasing (max of half-plane distances) adds a little
        # area at sharp corners, most for the triangle (+6% measured, axis-aligned)
        assert ratio[name] == pytest.approx(AREA_PER_SIZE2[name], rel=0.07), name
    # the classes differ in outline, not only in label: their area constants are ordered as designed
    assert sorted(ratio, key=ratio.get) == sorted(AREA_PER_SIZE2, key=AREA_PER_SIZE2.get)
    yy, xx = np.mgrid[0:16, 0:16] + 0.5
    cx = (mask * xx).sum((1, 2)) / area
    cy = (mask * yy).sum((1, 2)) / area
    assert np.abs(cx - f["x"][alone]).max() < 1.0 and np.abs(cy - f["y"][alone]).max() < 1.0


def test_main_colour_and_shading_at_the_centre(rich):
    img, f = rich
    i = np.arange(len(img))
    centre = img[i, :, f["y"].astype(int), f["x"].astype(int)]  # [N, 3]: always the main object (drawn last)
    # the pixel centre is within 1 pixel of the object's centre, where the light is 1 - shade / 2 (+- shade / 10)
    expected = SCENE_COLOURS[f["colour"]] * (1 - f["shade"] / 2)[:, None]
    assert np.abs(centre - expected).max() < 0.1
    # nearest palette colour (by direction) recovers the colour factor
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    assert ((unit(centre) @ unit(SCENE_COLOURS).T).argmax(1) == f["colour"]).all()


def test_generation_is_fast():
    start = time.perf_counter()
    images, _ = generate_scenes(10_000, seed=123)
    seconds = time.perf_counter() - start
    assert images.shape == (10_000, 3, 16, 16)
    assert seconds < 10  # ~1.5 s on one busy core; the whole benchmark regenerates in seconds


def test_evaluator_pool_is_the_procedural_test_split(tmp_path):
    """The metric's reference is the whole train split and its held-out pool the 10,000 test images,
    so floor resamples of 2000 never touch the reference. Checked on the split sizes the evaluator
    derives (no classifier trained here: that is test_metrics' job)."""
    from probe.quality.metrics import default_n_samples

    n = default_n_samples("scenes")
    assert n == 2000
    n_train, n_test = SCENE_COUNT["train"], SCENE_COUNT["test"]
    n_reference = min(10_000, n_train, n_train + n_test - int(np.ceil(1.5 * n)))
    assert n_reference == n_train and n_test >= 5 * n  # 5 floor resamples fit in the pool without repeats


def test_teacher_and_extraction_run_on_scenes(tmp_path):
    from probe.features.extract import extract_features
    from probe.features.store import FeatureStore
    from train.teacher import TeacherConfig, train_teacher

    run = train_teacher(TeacherConfig(out=str(tmp_path / "t"), data="scenes", preset="test", steps=2, batch=8,
                                      eval_samples=0, sample_steps=2), progress=False)
    assert (run / "samples.png").exists()
    out = extract_features(run, "scenes", out=tmp_path / "f.h5", progress=False, split="test", n_samples=16,
                           batch=16)
    store = FeatureStore.open(out)
    test = load_dataset("scenes", "test")
    assert set(store.factors) == set(test.factors)
    np.testing.assert_array_equal(store.factors["colour"], test.factors["colour"][:16])  # the first 16, in order


def test_bench_script_criteria_and_table():
    """benchmarks/bench_benchmark_data.py: the issue-15 criteria and the table row, from given figures."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_benchmark_data as bb

    floor = {"fd": 1.0, "fd_std": 0.5, "kid": 0.0, "kid_std": 1.0, "fd_inf": 0.0, "fd_inf_std": 1.0}
    model = {"fd": 5.0, "fd_std": 0.1, "kid": 3.0, "kid_std": 0.1, "fd_inf": 4.0, "fd_inf_std": 0.2,
             "coverage": 1.0, "precision": 0.69, "recall": 0.9,
             "memorisation": {"pixel": {"nn_ratio": 1.0}, "features": {"nn_ratio": 0.99}}}
    r = {"dataset": "scenes", "num_classes": 4, "n_factors": 22, "n_train": 10, "n_test": 20, "load_s": 0.1,
         "evaluator": {"n_samples": 8, "n_reference": 10, "n_heldout": 20, "classifier_test_accuracy": 0.9},
         "floor": floor, "result": model, "train_time": {"wall_s": 60.0, "cpu_s": 50.0}, "eval_s": 3.0,
         "grid": "g.png"}
    # FD 5 >= 3 x 1; floor std 0.5 > 0.1 x (5 - 1) = 0.4; coverage 1; precision 0.69 < 0.7
    assert bb.criteria(r) == {"fd >= 3x floor": True, "floor std <= 0.1 x (fd - floor)": False,
                              "coverage 1.0": True, "precision >= 0.7": False}
    text = bb.markdown([r], 1.0)
    row = next(line for line in text.splitlines() if line.startswith("| scenes"))
    assert "| 5.0 | 8 |" in row  # ratio 5 / 1, gap (5 - 1) / 0.5
    assert "60 / 50" in row and text.count("NO") == 2
    # several seeds of one setting: a row each, named by seed, and their spread with the criteria count
    default = {"lr_cooldown": bb.DEFAULTS["lr_cooldown"]}
    r1 = {**r, "seed": 1, "changed": default, "result": {**model, "fd": 7.0, "precision": 0.75}}
    r0 = {**r, "seed": 0, "changed": default}
    text = bb.markdown([r0, r1], 1.0)
    assert "| scenes, seed 0 |" in text and "| scenes, seed 1 |" in text and "lr_cooldown" not in text
    summary = next(line for line in text.splitlines() if line.startswith("- scenes over seeds 0, 1"))
    assert "fd 6 +- 1.4 (5-7)" in summary and "precision 0.72 +- 0.042 (0.69-0.75)" in summary
    assert "1/2 (precision >= 0.7)" in summary and "2/2 (coverage 1.0)" in summary
    # a changed option names its row and forms its own group
    other = 0.5 if bb.DEFAULTS["lr_cooldown"] != 0.5 else 0.0
    rc = {**r, "seed": 0, "changed": {"lr_cooldown": other}}
    assert f"| scenes, seed 0, lr_cooldown {other:g} |" in bb.markdown([r0, rc], 1.0)
    # another sampler names its row and is never pooled with the default sampler's rows
    rs = {**r, "seed": 1, "changed": default, "sampler": "heun-100-churn100[0.05,50]",
          "result": {**model, "precision": 0.8}}
    rs0 = {**rs, "seed": 0, "result": {**model, "precision": 0.72}}
    text = bb.markdown([r0, r1, rs0, rs], 1.0)
    assert "| scenes, seed 1, sampler heun-100-churn100[0.05,50] |" in text
    summaries = [line for line in text.splitlines() if line.startswith("- scenes")]
    pooled = [line for line in summaries if "over seeds" in line]
    assert len(pooled) == 2 and "2/2 (precision >= 0.7)" in pooled[1] and "1/2 (precision >= 0.7)" in pooled[0]
    assert "(sampler heun-100-churn100[0.05,50]) over seeds 0, 1" in pooled[1]


def test_scenes_render_in_chunks_gives_the_same_images_and_factors(monkeypatch):
    """generate_scenes draws every factor first, then renders in chunks to bound its memory: the
    chunk size must change no pixel and no factor (rich design: distractors, occlusion, rotation)."""
    from probe.core import data as D

    monkeypatch.setattr(D, "SCENE_RENDER_CHUNK", 1000)
    whole, fw = D.generate_scenes(301, 7, design=D.SCENE_DESIGN_RICH)
    monkeypatch.setattr(D, "SCENE_RENDER_CHUNK", 64)  # 5 chunks, the last one partial
    parts, fp = D.generate_scenes(301, 7, design=D.SCENE_DESIGN_RICH)
    assert parts.dtype == np.float32 and parts.shape == (301, 3, D.SCENE_SIZE, D.SCENE_SIZE)
    np.testing.assert_array_equal(parts, whole)
    assert fp.keys() == fw.keys() and "d1_visible" in fp
    for k in fw:
        np.testing.assert_array_equal(fp[k], fw[k])


def test_bench_script_measures_a_teacher_with_the_stochastic_sampler(tiny_teacher, tmp_path):
    """measure(): the teacher scored with the asked-for sampler, which names its row; the sample grid is
    written beside the teacher and named without the machine's path."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_benchmark_data as bb

    tiny_teacher = shutil.copytree(tiny_teacher, tmp_path / "teacher")   # the grid is written beside it
    r = bb.measure("digits", Path(tiny_teacher), draws=1, steps=4, churn=5.0)
    assert r["sampler"].startswith("heun-4-churn5[") and r["result"]["sampler"] == r["sampler"]
    assert bb.row_label(r).endswith(f"sampler {r['sampler']}")
    assert (Path(tiny_teacher) / f"bench_samples_{r['sampler']}.png").exists()
    assert not r["grid"].startswith("/") and str(tiny_teacher) not in r["grid"]
    assert set(bb.criteria(r)) == {"fd >= 3x floor", "floor std <= 0.1 x (fd - floor)", "coverage 1.0",
                                   "precision >= 0.7"}
