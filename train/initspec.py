"""Initialisation specs: which tensors of the one-step generator come from where (docs/method.md §4-5).

A spec is a short string given to ``--init``. It is parsed and checked before any training, then
applied to a fresh copy of the teacher's architecture. Grammar::

    spec     := term ( ("+" | ";") term )*
    term     := keyword [ "@" SEED ] [ ":" argument ]
    base     := "teacher"              every tensor copied from the teacher (the default)
              | "random"               the architecture's own fresh initialisation
              | "from:" PATH           every tensor from another model: a run directory (teacher or
                                       generator, e.g. a narrow-band teacher or a regressed generator)
                                       or a diffusers UNet / DDPM directory; "from:@NAME" names a
                                       prerequisite of an ablation grid (resolved by the grid runner)
    modifier := "keep:" GLOBS          keep the matching modules, re-initialise everything else
              | "reinit:" GLOBS        re-initialise the matching modules
              | "shuffle" [":" GLOBS]  permute each matching tensor's entries (all tensors without GLOBS)
    GLOBS    := glob ("," glob)*       fnmatch patterns over module paths or tensor names of the UNet
                                       ("down_blocks.*", "mid_block", "conv_in.weight")

Only the first term may be a base; a spec that starts with a modifier has the base ``teacher``.
Modifiers apply left to right. A glob selects a tensor when it matches the tensor's name or any
module path above it, so ``mid_block`` selects every tensor of the mid block.

Seeds. ``@SEED`` on ``random``, ``keep``, ``reinit`` or ``shuffle`` overrides the run seed for that
term. Re-initialised tensors are copied from a fresh UNet of the same config built under
``torch.manual_seed(seed)`` (never zeros), so ``reinit:X`` at seed s gives exactly the tensors that
``random`` at seed s gives. A shuffled tensor is ``t.flatten()[perm].view_as(t)`` with ``perm``
drawn from numpy's generator seeded by (seed, crc32(tensor name)): same values and statistics,
learned structure gone, independent of which other tensors are shuffled.

Examples (the rows of the controls table, docs/method.md §5)::

    teacher                                   full teacher
    random                                    random
    reinit:conv_in,conv_out,time_embedding    teacher features, no teacher I/O mapping
    keep:down_blocks.*   keep:up_blocks.*   keep:mid_block     one part from the teacher
    shuffle        shuffle@7:down_blocks.*    per-tensor shuffled teacher
    from:runs/band_teacher                    a denoiser trained only around sigma_init
    from:runs/regressed                       a generator regressed onto the teacher's samples
    from:runs/band_teacher+reinit:conv_out    combinations

``apply_init_spec`` returns the denoiser and a report saying, per tensor, where it came from, with
counts and fractions per source (``teacher``, ``random``, ``shuffled``, ``from:PATH``,
``shuffled from:PATH``) overall and per top-level module, and the parameter fractions per coarse
category (teacher / random / shuffled / other source). PATHs cannot contain "+" or ";".
"""

from __future__ import annotations

import fnmatch
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from probe.core.edm import Denoiser
from probe.core.errors import UserError
from probe.core.models import load_model
from train.student.ratio_net import fresh_unet, wrap_like

BASES = ("teacher", "random", "from")
MODIFIERS = ("keep", "reinit", "shuffle")
KEYWORDS = BASES + MODIFIERS
CATEGORIES = ("teacher", "random", "shuffled", "other")   # coarse sources, fractions in every report
SEEDED = ("random", "keep", "reinit", "shuffle")        # terms that draw random numbers
_TERM = re.compile(r"^(?P<kw>[A-Za-z_]+)(?:@(?P<seed>[^:]*))?(?::(?P<arg>.*))?$", re.S)
# config keys that do not change what a state dict means
_CONFIG_IGNORED = {"_name_or_path", "_class_name", "_diffusers_version", "_use_default_values", "sample_size"}


@dataclass(frozen=True)
class Term:
    """One part of a spec."""

    op: str                        # one of KEYWORDS
    patterns: tuple = ()           # module / tensor globs (keep, reinit, shuffle)
    path: str | None = None        # model path or "@NAME" (from)
    seed: int | None = None        # "@SEED" override; None = the run seed
    text: str = ""                 # the part as written, for messages

    def canonical(self) -> str:
        s = self.op + (f"@{self.seed}" if self.seed is not None else "")
        if self.op == "from":
            return f"{s}:{self.path}"
        return s + (":" + ",".join(self.patterns) if self.patterns else "")


@dataclass(frozen=True)
class InitSpec:
    """A parsed spec: a base term followed by modifiers."""

    text: str
    terms: tuple

    @property
    def base(self) -> Term:
        return self.terms[0]

    @property
    def modifiers(self) -> tuple:
        return self.terms[1:]

    def canonical(self) -> str:
        return "+".join(t.canonical() for t in self.terms)

    def refs(self) -> list[str]:
        """Names of grid prerequisites the spec refers to ("from:@NAME")."""
        return [t.path[1:] for t in self.terms if t.op == "from" and t.path.startswith("@")]


# ---------------------------------------------------------------------------------- parsing
def parse_init_spec(spec: str) -> InitSpec:
    """Parse ``spec`` (grammar in the module docstring); UserError naming the offending part."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty init spec; use e.g. 'teacher', 'random', 'reinit:conv_in' or 'from:PATH'")
    parts = [p.strip() for p in re.split(r"[+;]", spec)]
    terms = []
    for i, part in enumerate(parts):
        if not part:
            raise UserError(f"init spec {spec!r}: empty part (two separators in a row or one at an end)")
        term = _parse_term(part, spec)
        if term.op in BASES and i > 0:
            raise UserError(f"init spec {spec!r}: {part!r} is a base ({', '.join(BASES)}) and may only come first")
        terms.append(term)
    if terms[0].op not in BASES:
        terms.insert(0, Term("teacher", text="teacher"))
    return InitSpec(spec.strip(), tuple(terms))


def _parse_term(part: str, spec: str) -> Term:
    m = _TERM.match(part)
    kw = m.group("kw").lower() if m else part.split(":")[0].split("@")[0]
    if not m or kw not in KEYWORDS:
        raise UserError(f"init spec {spec!r}: unknown keyword {kw!r} in part {part!r}; "
                        f"choose from {', '.join(KEYWORDS)}")
    seed, arg = m.group("seed"), m.group("arg")
    if seed is not None:
        if kw not in SEEDED:
            raise UserError(f"init spec {spec!r}: part {part!r}: '{kw}' takes no @SEED")
        if not seed.isdigit():
            raise UserError(f"init spec {spec!r}: part {part!r}: @SEED must be a non-negative integer, got {seed!r}")
        seed = int(seed)
    if kw in ("teacher", "random"):
        if arg is not None:
            raise UserError(f"init spec {spec!r}: part {part!r}: '{kw}' takes no ':' argument")
        return Term(kw, seed=seed, text=part)
    if kw == "from":
        if not arg or not arg.strip():
            raise UserError(f"init spec {spec!r}: part {part!r}: 'from' needs a path, e.g. from:runs/band_teacher")
        return Term(kw, path=arg.strip(), text=part)
    if arg is None and kw == "shuffle":
        return Term(kw, seed=seed, text=part)
    globs = tuple(g.strip() for g in (arg or "").split(","))
    if not arg or any(not g for g in globs):
        raise UserError(f"init spec {spec!r}: part {part!r}: '{kw}' needs a comma-separated list of module globs, "
                        f"e.g. {kw}:down_blocks.*,mid_block")
    return Term(kw, patterns=globs, seed=seed, text=part)


# ------------------------------------------------------------------------------- selection
def _prefixes(name: str) -> list[str]:
    bits = name.split(".")
    return [".".join(bits[:i]) for i in range(1, len(bits) + 1)]


def select_tensors(names, patterns) -> list[str]:
    """Tensor names selected by any glob (a glob matches the name or a module path above it)."""
    return [n for n in names if any(fnmatch.fnmatchcase(p, g) for p in _prefixes(n) for g in patterns)]


def top_module(name: str) -> str:
    """Reporting group of a tensor: its top-level module, with the index for module lists (down_blocks.1)."""
    bits = name.split(".")
    return ".".join(bits[:2]) if len(bits) > 2 and bits[1].isdigit() else bits[0]


def check_patterns(spec: InitSpec, names) -> None:
    """Every glob of every term must select at least one tensor of the model."""
    names = list(names)
    for term in spec.modifiers:
        for glob in term.patterns:
            if not select_tensors(names, [glob]):
                tops = sorted({n.split(".")[0] for n in names})
                raise UserError(f"init spec {spec.text!r}: part {term.text!r}: pattern {glob!r} matches no module "
                                f"or tensor of the model (top-level modules: {', '.join(tops)})")


def resolve_path(path: str, refs: dict | None) -> str:
    """A ``from:`` path with "@NAME" replaced by the path of that grid prerequisite."""
    if not path.startswith("@"):
        return path
    name = path[1:]
    if not refs or name not in refs:
        known = ", ".join(sorted(refs or {})) or "none"
        raise UserError(f"init spec refers to '@{name}', which is not a prerequisite of this grid (defined: {known})")
    return str(refs[name])


def resolve_refs(spec: str, refs: dict | None) -> str:
    """The spec as a string with every "from:@NAME" replaced by its path (for StudentConfig.init)."""
    parsed = parse_init_spec(spec)
    terms = [Term(t.op, t.patterns, resolve_path(t.path, refs), t.seed, t.text) if t.op == "from" else t
             for t in parsed.terms]
    return "+".join(t.canonical() for t in terms)


def validate_init_spec(spec, names, refs: dict | None = None, check_paths: bool = True) -> InitSpec:
    """Parse, then check globs against tensor ``names``, "@NAME" against ``refs`` (prerequisites that
    may not be built yet) and, with ``check_paths``, that plain ``from:`` paths exist."""
    parsed = spec if isinstance(spec, InitSpec) else parse_init_spec(spec)
    check_patterns(parsed, names)
    for term in parsed.terms:
        if term.op != "from":
            continue
        if term.path.startswith("@"):
            resolve_path(term.path, refs)
        elif check_paths and not Path(term.path).exists():
            raise UserError(f"init spec {parsed.text!r}: part {term.text!r}: {term.path} does not exist")
    return parsed


# -------------------------------------------------------------------------------- applying
# Fresh weights are drawn from their own seed stream: a teacher trained with seed s starts from
# manual_seed(s), and a "random" student with the same seed must not start from that same point.
FRESH_SEED_OFFSET = 7_919_000


def fresh_state(config, seed: int) -> dict:
    """State dict of a fresh UNet of ``config`` (seed stream offset from the teacher's; global RNG kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FRESH_SEED_OFFSET + int(seed))
        return fresh_unet(config).state_dict()


def shuffle_tensor(t: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """``t`` with its entries permuted by a permutation fixed by (seed, name)."""
    perm = np.random.default_rng([int(seed), zlib.crc32(name.encode())]).permutation(t.numel())
    return t.flatten()[torch.from_numpy(perm).to(t.device)].view_as(t).clone()


def load_source(path: str, target: Denoiser, label: str):
    """Load another model and check that its UNet fits the target denoiser tensor by tensor."""
    src = load_model(path)
    if src.denoiser.parameterisation != target.parameterisation:
        raise UserError(f"{label}: {path} is a {src.denoiser.parameterisation!r} model but the teacher is "
                        f"{target.parameterisation!r}; its weights would mean something else here")
    want, have = target.unet.state_dict(), src.unet.state_dict()
    for name, t in want.items():
        if name not in have:
            raise UserError(f"{label}: tensor {name!r} of the teacher is missing in {path} (another architecture)")
        if tuple(have[name].shape) != tuple(t.shape):
            raise UserError(f"{label}: tensor {name!r} has shape {tuple(have[name].shape)} in {path} but "
                            f"{tuple(t.shape)} in the teacher")
    extra = sorted(set(have) - set(want))
    if extra:
        raise UserError(f"{label}: {path} has tensor {extra[0]!r} the teacher does not have (another architecture)")
    return src


def _config_differences(a, b) -> list[str]:
    keys = (set(a) | set(b)) - _CONFIG_IGNORED
    return sorted(k for k in keys if a.get(k) != b.get(k))


def apply_init_spec(spec, teacher, seed: int = 0, refs: dict | None = None,
                    sigma_init: float | None = None) -> tuple[Denoiser, dict]:
    """A trainable denoiser with the teacher's architecture and class, initialised by ``spec``.

    spec       : a spec string or ``InitSpec``
    teacher    : ``LoadedModel`` (probe/core/models.py) whose architecture and denoiser wrapper are used
    seed       : run seed; the seed of every term without its own "@SEED"           (default 0)
    refs       : {"NAME": path} for "from:@NAME" parts                               (default None)
    sigma_init : the student's sigma_init, checked against generator sources          (default None)

    Returns ``(denoiser in train mode with gradients on, report)``; the global RNG is untouched.
    """
    parsed = spec if isinstance(spec, InitSpec) else parse_init_spec(spec)
    if int(seed) < 0:
        raise UserError(f"the seed must be >= 0 for init specs, got {seed}")
    target = teacher.denoiser
    target_sd = target.unet.state_dict()
    names = list(target_sd)
    check_patterns(parsed, names)
    config = target.unet.config
    fresh_cache: dict = {}

    def fresh(term: Term) -> dict:
        s = int(seed) if term.seed is None else term.seed
        if s not in fresh_cache:
            fresh_cache[s] = fresh_state(config, s)
        return fresh_cache[s]

    warnings, source_models = [], {}
    base = parsed.base
    if base.op == "teacher":
        tensors = {n: t.detach().clone() for n, t in target_sd.items()}
        sources = dict.fromkeys(names, "teacher")
    elif base.op == "random":
        tensors = {n: t.clone() for n, t in fresh(base).items()}
        sources = dict.fromkeys(names, "random")
    else:
        assert base.path is not None  # the parser gives every "from:" term its path
        path = resolve_path(base.path, refs)
        label = f"from:{base.path}"
        src = load_source(path, target, f"init spec part {base.text!r}")
        tensors = {n: t.detach().clone() for n, t in src.unet.state_dict().items()}
        sources = dict.fromkeys(names, label)
        source_models[label] = {"path": str(path), "kind": src.kind, "sha256": src.sha256(),
                                "sigma_init": src.info.get("sigma_init"), "sigma_range": src.info.get("sigma_range"),
                                "dataset": src.dataset}
        diff = _config_differences(dict(src.unet.config), dict(config))
        if diff:
            warnings.append(f"{path}: UNet config differs from the teacher's in {', '.join(diff)}; "
                            f"weights copied into the teacher's architecture")
        s_init = src.info.get("sigma_init")
        if sigma_init is not None and s_init is not None and abs(float(s_init) - float(sigma_init)) > 1e-9:
            warnings.append(f"{path} was made as a generator at sigma_init={s_init}, the student uses {sigma_init}")

    for term in parsed.modifiers:
        chosen = set(select_tensors(names, term.patterns)) if term.patterns else set(names)
        if term.op == "keep":
            for n in names:
                if n not in chosen:
                    tensors[n], sources[n] = fresh(term)[n].clone(), "random"
        elif term.op == "reinit":
            for n in chosen:
                tensors[n], sources[n] = fresh(term)[n].clone(), "random"
        else:  # shuffle
            s = int(seed) if term.seed is None else term.seed
            for n in names:
                if n in chosen:
                    tensors[n] = shuffle_tensor(tensors[n], s, n)
                    sources[n] = _shuffled(sources[n])

    with torch.random.fork_rng(devices=[]):
        unet = fresh_unet(config)
    unet.load_state_dict(tensors)
    unet.to(next(target.unet.parameters()).device)
    denoiser = wrap_like(target, unet).train().requires_grad_(True)
    report = build_report(parsed, int(seed), {n: t.numel() for n, t in target_sd.items()}, sources)
    report.update(source_models=source_models, warnings=warnings)
    return denoiser, report


def _shuffled(source: str) -> str:
    if source == "teacher":
        return "shuffled"
    if source == "random":  # a permutation of a fresh initialisation is still a fresh initialisation
        return "random"
    return source if source.startswith("shuffled") else f"shuffled {source}"


# --------------------------------------------------------------------------------- report
def build_report(spec: InitSpec, seed: int, sizes: dict, sources: dict) -> dict:
    """Counts and fractions of tensors / parameters per source, overall and per top-level module."""
    total_p = sum(sizes.values())
    per_source: dict = {}
    per_module: dict = {}
    for name, src in sources.items():
        entry = per_source.setdefault(src, {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += sizes[name]
        mod = per_module.setdefault(top_module(name), {})
        mod[src] = mod.get(src, 0) + sizes[name]
    for entry in per_source.values():
        entry["fraction"] = entry["parameters"] / total_p if total_p else 0.0
    categories = dict.fromkeys(CATEGORIES, 0.0)
    for src, entry in per_source.items():
        categories[source_category(src)] += entry["fraction"]
    teacher = per_source.get("teacher", {"tensors": 0, "parameters": 0})
    fresh = per_source.get("random", {"tensors": 0, "parameters": 0})
    return {"spec": spec.text, "canonical": spec.canonical(), "seed": seed,
            "total": {"tensors": len(sizes), "parameters": total_p},
            "sources": per_source, "categories": categories, "modules": per_module, "tensor_sources": dict(sources),
            # flat figures kept for readers of the minimal report
            "tensors_copied": teacher["tensors"], "parameters_copied": teacher["parameters"],
            "tensors_reinitialised": fresh["tensors"], "parameters_reinitialised": fresh["parameters"]}


def source_category(source: str) -> str:
    """teacher | random | shuffled | other (any "from:PATH" source) for a report's source label."""
    if source in ("teacher", "random"):
        return source
    return "shuffled" if source.startswith("shuffled") else "other"


def format_init_report(report: dict) -> str:
    """A few lines saying where the parameters came from, overall and per top-level module."""
    total = report["total"]["parameters"]
    lines = [f"init {report['spec']!r} (seed {report['seed']}): {report['total']['tensors']} tensors, "
             f"{total:,} parameters; per source:"]
    for src, v in sorted(report["sources"].items(), key=lambda kv: -kv[1]["parameters"]):
        lines.append(f"  {src:<28} {v['tensors']:>5} tensors {v['parameters']:>12,} parameters {v['fraction']:7.1%}")
    for mod, by in report["modules"].items():
        shares = ", ".join(f"{src} {n / max(sum(by.values()), 1):.0%}" for src, n in sorted(by.items()))
        lines.append(f"    {mod:<26} {shares}")
    lines.insert(len(report["sources"]) + 1, "  per top-level module:")
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)
