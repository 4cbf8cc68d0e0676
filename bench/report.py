"""Results: per-run records, median/min/max figures, markdown table, JSON file."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    digits: int = 2
    summary: bool = False  # also a row of the summary table at the top


@dataclass
class RunRecord:
    run: int
    status: str = "ok"  # ok | failed | timeout | skipped
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # unverified values, notes, pids, paths
    started_at: str = ""
    wall_s: float = 0.0


@dataclass
class WorkloadResult:
    name: str
    description: str
    metrics: list[Metric]
    settings: dict = field(default_factory=dict)
    setup: dict = field(default_factory=dict)
    runs: list[RunRecord] = field(default_factory=list)
    status: str = "ok"  # ok | skipped | setup-failed
    error: str | None = None
    mode: str = "loopback"  # network mode the workload ran in
    # Contender workloads: {"figures": [Metric], "columns": [names], "base": "objfs",
    # "peers": [names]}; metrics keys are "<column>.<figure>" and "<base>/<peer>.<figure>".
    matrix: dict | None = None

    def figures(self) -> dict[str, dict]:
        out = {}
        for m in self.metrics:
            vals = [r.metrics[m.key] for r in self.runs if m.key in r.metrics]
            fails: dict[str, int] = {}
            for r in self.runs:
                label = r.extra.get("row_failures", {}).get(m.key)
                if label and m.key not in r.metrics:
                    fails[label] = fails.get(label, 0) + 1
                elif r.status != "ok" and m.key not in r.metrics:
                    fails[r.status] = fails.get(r.status, 0) + 1
            if not vals:
                out[m.key] = {"n": 0, "of": len(self.runs), "failures": fails}
                continue
            out[m.key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                          "n": len(vals), "of": len(self.runs), "unit": m.unit,
                          "failures": fails}
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["figures"] = self.figures()
        return d

    @property
    def title(self) -> str:
        return self.name if self.mode == "loopback" else f"{self.name} @ {self.mode} network"


def _fmt(v: float, digits: int) -> str:
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 100:
        return f"{int(v):,}"
    return f"{v:,.{digits}f}"


def cell(f: dict, digits: int, suffix: str = "") -> str:
    """``median (min–max)`` of one figure, its count when not every run measured it, and any
    failures (``failed: EROFS``, ``timeout``...) with how many runs they hit."""
    fails = f.get("failures") or {}
    of = f.get("of", 0)
    fail_txt = ", ".join(lab if k == of else f"{lab} ({k}/{of})" for lab, k in fails.items())
    if f.get("n", 0) == 0:
        return fail_txt or "—"
    med = _fmt(f["median"], digits) + suffix
    txt = med if f["n"] == 1 else (f"{med} ({_fmt(f['min'], digits)}–"
                                   f"{_fmt(f['max'], digits)})")
    if f["n"] < of:
        txt += f" [{f['n']}/{of}]"
    if fail_txt:
        txt += f"; {fail_txt}"
    return txt


def matrix_table(res: WorkloadResult) -> list[str]:
    """Figures as rows, contenders as columns, then objfs/peer ratio columns (median of the
    per-run ratios: both sides measured in the same run)."""
    mx = res.matrix
    figs = res.figures()
    cols, base, peers = mx["columns"], mx["base"], mx["peers"]
    head = ["figure", *cols, *(f"{base}/{p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    for m in mx["figures"]:
        row = [f"{m.label} ({m.unit})"]
        for c in cols:
            row.append(cell(figs.get(f"{c}.{m.key}", {}), m.digits))
        for p in peers:
            f = figs.get(f"{base}/{p}.{m.key}", {})
            row.append(cell({**f, "failures": {}}, 2, "×") if f.get("n") else "—")
        lines.append("| " + " | ".join(row) + " |")
    return lines


SUMMARY_COLUMNS = ("objfs", "s3fs", "rclone", "s5cmd", "local", "boto3")


def summary_table(results: list[WorkloadResult]) -> list[str]:
    """One table of the key figures of every contender workload (both network modes):
    contenders and baselines as columns, then objfs/s3fs and objfs/rclone."""
    mats = [r for r in results if r.matrix and r.runs]
    if not mats:
        return []
    present = [c for c in SUMMARY_COLUMNS if any(c in r.matrix["columns"] for r in mats)]
    peers = [p for p in ("s3fs", "rclone") if p in present and "objfs" in present]
    head = ["workload", "figure", *present, *(f"objfs/{p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in mats:
        figs = r.figures()
        for m in r.matrix["figures"]:
            if not m.summary:
                continue
            row = [r.title, f"{m.label} ({m.unit})"]
            for c in present:
                row.append(cell(figs[f"{c}.{m.key}"], m.digits)
                           if c in r.matrix["columns"] else "")
            for p in peers:
                f = figs.get(f"objfs/{p}.{m.key}", {})
                row.append(cell({**f, "failures": {}}, 2, "×") if f.get("n") else "—")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(res: WorkloadResult) -> str:
    lines = [f"### {res.title}", "", res.description, ""]
    if res.status != "ok":
        lines += [f"**{res.status}**: {res.error}", ""]
    if res.setup:
        lines.append("setup: " + ", ".join(f"{k}={v}" for k, v in res.setup.items()))
        lines.append("")
    if res.runs:
        counts = {}
        for r in res.runs:
            counts[r.status] = counts.get(r.status, 0) + 1
        lines.append(f"runs: {len(res.runs)} (" +
                     ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")")
        lines.append("")
        figs = res.figures()
        if res.matrix:
            lines += matrix_table(res)
            lines += ["", "Each cell: median (min–max) of the runs; [n/N] when only n of N runs "
                      "measured it; failures by name. Ratio columns: objfs value / peer value "
                      "per run, then the median (for MB/s and files/s above 1 means objfs is "
                      "faster; for seconds and MiB below 1 means objfs is faster/smaller)."]
        else:
            lines.append("| figure | median | min | max | unit | runs measured |")
            lines.append("|---|---:|---:|---:|---|---:|")
            for m in res.metrics:
                f = figs[m.key]
                if f["n"] == 0:
                    lines.append(f"| {m.label} | {cell(f, m.digits)} | — | — | {m.unit} | "
                                 f"0/{f['of']} |")
                else:
                    lines.append(f"| {m.label} | {_fmt(f['median'], m.digits)} | "
                                 f"{_fmt(f['min'], m.digits)} | {_fmt(f['max'], m.digits)} | "
                                 f"{m.unit} | {f['n']}/{f['of']} |")
        loads = [(r.run, r.extra.get("host")) for r in res.runs if r.extra.get("host")]
        if loads:
            lines += ["", "whole-machine CPU busy during each run (all processes; the origin, "
                      "the client and anything else on the host): " +
                      ", ".join(f"run {n} {h['cpu_busy_pct']:.0f}% (load {h['loadavg_start']:.1f}"
                                f"→{h['loadavg_end']:.1f})" for n, h in loads)]
        bad = [r for r in res.runs if r.status != "ok"]
        if bad:
            lines += ["", "failed runs (their completed steps are included above):", ""]
            for r in bad:
                err = (r.error or "").strip().replace("\n", " ⏎ ")
                lines.append(f"- run {r.run}: **{r.status}** — {err[:600]}")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, stamp: str, header: dict, results: list[WorkloadResult],
                  md_text: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / stamp
    doc = dict(header)
    doc["workloads"] = [r.to_json() for r in results]
    jpath = base.with_suffix(".json")
    jpath.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    mpath = base.with_suffix(".md")
    mpath.write_text(md_text)
    return jpath, mpath
