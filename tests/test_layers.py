"""The packages form one-way layers: a module imports only from its own layer or the layers below.

Layers, bottom to top (docs/architecture.md draws them):

    0  probe.core       errors, run directories, progress, data sets, EDM / model construction, EMA, torch.distributed
    1  probe.quality    the metric: feature classifier, Frechet distance, precision/recall, evaluating a model
    2  probe.features   forward hooks, feature extraction, the HDF5 feature store
    3  train            teacher, student (loop, losses, methods, ratio nets), init specs, regression, ablation grids
    4  analysis         CKA family, linear probes, UMAP, heatmaps, grid summaries, the verdict, the PDF report
    5  probe.cli, probe.demo, probe.pipeline   the composition root: the only modules that may use every layer

The check reads every import statement of the source tree (function-local ones included) with ``ast``,
so a new module or a new import is covered without editing this file, and a module that belongs to
no layer fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("probe", "train", "analysis")
LAYERS = {  # module prefix -> rank; the longest matching prefix decides
    "probe.core": 0, "probe.quality": 1, "probe.features": 2, "train": 3, "analysis": 4,
    "probe.cli": 5, "probe.demo": 5, "probe.pipeline": 5,
}
EXACT = {"probe": 0}  # the package root only holds __version__


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int | None:
    if module in EXACT:
        return EXACT[module]
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def imports_of(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, anywhere in the file."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import mod" may name a submodule; count the deepest one that exists
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in source_files() if layer(module_name(p)) is None]
    assert not missing, f"modules in no layer (add them to LAYERS and docs/architecture.md): {missing}"


def test_imports_run_one_way(capsys):
    upward, edges = [], 0
    for path in source_files():
        importer = module_name(path)
        for imported in sorted(imports_of(path)):
            edges += 1
            if layer(imported) is not None and layer(imported) > layer(importer):
                upward.append(f"{importer} (layer {layer(importer)}) imports {imported} (layer {layer(imported)})")
    with capsys.disabled():
        print(f"\nimport graph: {len(source_files())} modules, {edges} imports between our modules, "
              f"{len(upward)} running upward")
    assert edges > 50  # the walk really found the tree's imports
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


def test_the_check_catches_an_upward_import(tmp_path):
    """The rule itself: a core module importing the CLI would be reported."""
    assert layer("probe.core.runs") < layer("probe.cli")
    assert layer("analysis.verdict") > layer("train.teacher") > layer("probe.features.store")
    assert layer("probe") == 0 and layer("probe.somewhere_new") is None
