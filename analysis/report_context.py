"""What every report section shares: the inputs read from disk (``Grid``), the document being
written (``Ctx``) and small layout helpers (arm colours, verdict cell colours, column counts).

``analysis.report`` builds one ``Ctx``; the sections (``report_sections`` for page one, the claim,
the evidence, caveats and next steps; ``report_features`` for the explanation from features) add
blocks to it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd

from analysis.report_data import (
    arm_table,
    base_metric,
    claim_rows,
    contrast_rows,
    curve_table,
    drift_table,
    load_verdict,
    teacher_arm,
    verdict_settings,
)
from analysis.report_layout import VERDICT_STYLE, Document, NeedSpace

ARM_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
               "#bcbd22"]


# ---------------------------------------------------------------------------------- inputs
def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if Path(path).exists() else {}


def read_metrics_frame(run: Path) -> pd.DataFrame:
    p = Path(run) / "metrics.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
    return pd.DataFrame(rows)


def run_label(run: Path) -> str:
    cfg = read_json(Path(run) / "config.json").get("config", {})
    return f"{cfg.get('method', '?')} / init {cfg.get('init', '?')} / seed {cfg.get('seed', '?')}"


@dataclass
class Grid:
    """One ablation directory and everything the report reads from it."""

    path: Path
    grid: dict
    verdict: dict | None
    verdict_text: str
    contrasts: pd.DataFrame
    claims: pd.DataFrame
    settings: dict
    reference: dict
    summary: pd.DataFrame
    arms: pd.DataFrame | None
    curves: pd.DataFrame
    cka: pd.DataFrame | None
    probes: pd.DataFrame | None
    drift: pd.DataFrame
    metric: str
    steps: int | None
    config: dict = field(default_factory=dict)    # how the grid was run (grid.json "config")

    @classmethod
    def read(cls, path: Path) -> Grid:
        path = Path(path)
        verdict, text = load_verdict(path)
        settings = verdict_settings(verdict)
        metric = settings.get("metric") or "fd_final"
        reference = read_json(path / "reference.json")
        summary = pd.read_csv(path / "summary.csv")
        agg = pd.read_csv(path / "aggregate.csv") if (path / "aggregate.csv").exists() else None
        curves = pd.read_csv(path / "curves.csv") if (path / "curves.csv").exists() else pd.DataFrame(
            columns=["run", "init", "method", "seed", "step", "metric", "value"])
        recorded = read_json(path / "grid.json")
        grid = recorded.get("grid", {})
        steps = grid.get("student", {}).get("steps")
        if steps is None and "steps_done" in summary:
            steps = int(summary["steps_done"].max())
        return cls(path, grid, verdict, text, contrast_rows(verdict), claim_rows(verdict), settings, reference,
                   summary, arm_table(agg, reference) if agg is not None and len(agg) else None, curves,
                   (pd.read_csv(path / "cka_teacher_student.csv")
                    if (path / "cka_teacher_student.csv").exists() else None),
                   pd.read_csv(path / "probes.csv") if (path / "probes.csv").exists() else None,
                   drift_table(curves), metric, steps, recorded.get("config", {}))

    @property
    def name(self) -> str:
        return self.path.name

    def teacher_curve(self) -> pd.DataFrame | None:
        base = teacher_arm(self.summary) if len(self.summary) else None
        c = curve_table(self.curves, base_metric(self.metric))
        return c[c["init"] == base] if base is not None and len(c) else None

    def command(self) -> str:
        """The command that reruns (and extends) this grid."""
        cfg = self.config
        text = f"probe train ablation --config {cfg.get('config', self.grid.get('source', '<grid>'))} --out {self.path}"
        return text + (f" --teacher {cfg['teacher']}" if cfg.get("teacher") else "")

    def n_eval(self) -> int | None:
        return (self.reference.get("key") or {}).get("n_samples") or self.grid.get("student", {}).get("eval_samples")


class FoundInputs(Protocol):
    """What ``analysis.report.discover`` found (its ``Found``; a Protocol here: report imports this module)."""

    teachers: list
    students: list
    probe_tables: list
    cka_tables: list


class ReportSettings(Protocol):
    """The settings the sections read (``analysis.report.ReportConfig``)."""

    inputs: list
    title: str
    umap: bool
    seed: int
    max_students: int


@dataclass
class Ctx:
    """The document being written, the inputs, and the contents entries gathered on the way."""

    doc: Document
    found: FoundInputs
    cfg: ReportSettings
    grids: list
    entries: list = field(default_factory=list)   # (number, title, heading block, status)
    counters: list = field(default_factory=lambda: [0, 0])
    other_cka: list = field(default_factory=list)  # CKA tables not drawn as teacher maps (set by _teacher_pairs)

    def section(self, title: str, fn, level: int = 1, together: bool = False):
        """A numbered heading, then ``fn``'s blocks; ``together``: start a new page unless all fit here."""
        if level == 1:
            self.counters = [self.counters[0] + 1, 0]
            number = f"{self.counters[0]}"
        else:
            self.counters[1] += 1
            number = f"{self.counters[0]}.{self.counters[1]}"
        need = self.doc.add(NeedSpace()) if together else None
        start = len(self.doc.blocks)
        heading = self.doc.heading(f"{number}  {title}", level)
        slot = len(self.entries)
        self.entries.append(None)  # reserved: a section is listed before its subsections
        result = fn()
        if result is not True:
            self.doc.para(f"Omitted: {result}.", style="italic", color="0.35", size=8.5)
        if need is not None:
            need.keep = self.doc.blocks[start:]
        self.entries[slot] = (number, title, heading, "included" if result is True else f"omitted: {result}")
        return result


def verdict_cell(table_cells: list, col: int) -> tuple[dict, dict]:
    """(background, text colour) maps that colour a verdict column."""
    bg, fg = {}, {}
    for i, row in enumerate(table_cells):
        style = VERDICT_STYLE.get(str(row[col]).lower())
        if style:
            fg[(i, col)], bg[(i, col)] = style
    return bg, fg


def colour_map(arms: list[str]) -> dict:
    return {a: ARM_COLOURS[i % len(ARM_COLOURS)] for i, a in enumerate(arms)}


def balanced_cols(n: int, cells: int, most: int | None = None) -> int:
    """Panels per row: up to 5 small (<= 4 cells) or 4 larger panels, rows filled evenly (7 -> 4 + 3)."""
    most = most or (5 if cells <= 4 else 4)
    rows = math.ceil(n / most)
    return math.ceil(n / rows)
