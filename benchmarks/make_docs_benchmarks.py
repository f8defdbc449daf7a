"""Run the side-by-side comparison scripts and write their tables and plots into the docs.

``make bench-compare`` runs this script. It runs every ``benchmarks/compare_*.py`` in a subprocess, in
the same order every time (each script already times its candidates interleaved in one process and
reports medians). It turns the printed tables into Markdown and writes them into ``docs/benchmarks.md``
between markers; the prose outside the markers is kept. It also draws one PNG per script into
``docs/img/``. With ``--figures`` it only redraws the Concepts figure (``docs/img/concepts_pencil.png``),
which is deterministic (seeded) and needs no timing.

Usage::

    python benchmarks/make_docs_benchmarks.py            # full sizes (tens of minutes on 2 cores)
    python benchmarks/make_docs_benchmarks.py --quick    # every script's --quick smoke mode (~30 s)
    python benchmarks/make_docs_benchmarks.py --only eigen projection
    python benchmarks/make_docs_benchmarks.py --figures  # the Concepts figure only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"


@dataclass
class Table:
    """A parsed table: a header, rows of cells, and the script's other lines (settings, verdicts)."""

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    align: str = ""  # one character per column: "l" or "r"

    def markdown(self) -> str:
        align = self.align or "l" + "r" * (len(self.header) - 1)
        sep = ["---" if a == "l" else "---:" for a in align]
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join(sep) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ parsers
def _float(s: str) -> float:
    try:
        return float(s.rstrip("x"))
    except ValueError:
        return float("nan")


def parse_covariance(out: str) -> Table:
    t = Table(
        [
            "d",
            "dtype",
            "rqcore ms",
            "ref ms",
            "X.T@X ms",
            "gemm ms",
            "GF/s rqcore",
            "GF/s ref",
            "ref / rqcore",
            "X.T@X / rqcore",
            "gemm / rqcore",
            "f32 rel err",
        ],
        align="ll" + "r" * 10,
    )
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 12 and cells[0].isdigit() and cells[1].startswith("float"):
            t.rows.append(cells)
        elif line.strip() and not set(line.strip()) <= {"-"} and not line.lstrip().startswith("d "):
            t.notes.append(line.rstrip())
    return t


_EIGEN_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(.+?)\s+([\d.]+)\s+(\S+)\s+(ok|FAIL)\s+(\S+)\s*(.*)$")


def parse_eigen(out: str) -> Table:
    t = Table(
        ["d", "k", "solver", "time (s)", "max residual", "ok", "ratio vs fastest peer", "note"],
        align="rrlrrlrl",
    )
    for line in out.splitlines():
        m = _EIGEN_ROW.match(line)
        if m and not line.startswith("#"):
            t.rows.append([g.strip() for g in m.groups()])
        elif line.strip() and not line.lstrip().startswith("d "):
            t.notes.append(line.rstrip())
    return t


_PROJ_ROW = re.compile(r"^(float32|float64)\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(.*)$")


def parse_projection(out: str) -> Table:
    t = Table(["dtype", "case", "NumPy (ms)", "rqcore (ms)", "ratio", "verdict"], align="llrrrl")
    for line in out.splitlines():
        m = _PROJ_ROW.match(line)
        if m:
            t.rows.append([g.strip() for g in m.groups()])
        elif line.strip() and not set(line.strip()) <= {"-"} and not line.startswith("dtype "):
            t.notes.append(line.rstrip())
    return t


_CALIB_ROW = re.compile(r"^(.+?)\s+([\d.]+)\s+([\d.]+)x$")


def parse_calibration(out: str) -> Table:
    t = Table(["candidate", "median (s)", "vs forward + syrk"], align="lrr")
    for line in out.splitlines():
        m = _CALIB_ROW.match(line)
        if m:
            t.rows.append([m.group(1).strip(), m.group(2), m.group(3) + "×"])
        elif line.strip() and not line.startswith("candidate "):
            t.notes.append(line.rstrip())
    return t


def parse_step(out: str) -> Table:
    t = Table([], align="lrrrr")
    for line in out.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):
                continue
            if not t.header:
                t.header = cells
            else:
                t.rows.append(cells)
        elif line.strip():
            t.notes.append(line.rstrip())
    return t


# -------------------------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "svg.hashsalt": "rqcore"})
    return plt


def _save(fig: Any, name: str) -> Path:
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / name
    fig.savefig(path, metadata={"Software": None}, bbox_inches="tight")
    _plt().close(fig)
    return path


def _grouped_bars(
    ax: Any, groups: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False
) -> None:
    import numpy as np

    n = len(series)
    width = 0.8 / max(n, 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot_covariance(t: Table, name: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    groups = [f"d={r[0]}\n{r[1]}" for r in t.rows]
    series = {
        label: [_float(r[i]) for r in t.rows]
        for label, i in [
            ("rqcore update", 2),
            ("bare ?syrk (ref)", 3),
            ("S += X.T @ X", 4),
            ("GEMM from two buffers", 5),
        ]
    }
    _grouped_bars(ax, groups, series, "ms per update (median)")
    ax.set_title("StreamingCovariance.update against bare BLAS")
    return _save(fig, name)


def plot_eigen(t: Table, name: str) -> Path:
    plt = _plt()
    cases = list(dict.fromkeys((r[0], r[1]) for r in t.rows))
    solvers = list(dict.fromkeys(r[2] for r in t.rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases) + 3), 3.4))
    series: dict[str, list[float]] = {}
    for s in solvers:
        vals = []
        for d, k in cases:
            row = next((r for r in t.rows if (r[0], r[1], r[2]) == (d, k, s)), None)
            ok = row is not None and row[5] == "ok"
            vals.append(_float(row[3]) if ok and row is not None else float("nan"))
        series[s] = vals
    _grouped_bars(ax, [f"d={d}, k={k}" for d, k in cases], series, "seconds (median)", log=True)
    ax.set_title("generalized_topk against its peers (failed runs omitted)")
    return _save(fig, name)


def plot_projection(t: Table, name: str) -> Path:
    plt = _plt()
    cases = list(dict.fromkeys(r[1] for r in t.rows))
    dtypes = list(dict.fromkeys(r[0] for r in t.rows))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    series = {
        dt: [_float(next((r[4] for r in t.rows if r[0] == dt and r[1] == c), "nan")) for c in cases]
        for dt in dtypes
    }
    _grouped_bars(ax, [c.replace(" [a]", "*") for c in cases], series, "time / NumPy baseline")
    ax.axhline(1.3, color="k", ls="--", lw=0.8, label="goal 1.3×")
    ax.axhline(1.0, color="0.5", lw=0.6)
    ax.tick_params(axis="x", labelsize=7, rotation=15)
    ax.set_title("RayleighBasis.gate and NullspaceProjector.apply (* vs G − (G U) Uᵀ)")
    return _save(fig, name)


def plot_calibration(t: Table, name: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    labels = [r[0] for r in t.rows][::-1]
    ax.barh(labels, [_float(r[1]) for r in t.rows][::-1], color="C0")
    ax.set_xlabel("seconds per batch (median)")
    ax.set_title("Calibration pass against forward + bare ssyrk")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, name)


def plot_step(t: Table, name: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    groups = [r[0] for r in t.rows]
    series = {"full train step": [_float(r[2]) for r in t.rows]}
    if len(t.header) >= 5:
        series["optimizer step alone"] = [_float(r[4]) for r in t.rows]
    _grouped_bars(ax, groups, series, "time / plain AdamW")
    ax.axhline(1.10, color="k", ls="--", lw=0.8)
    ax.set_title("GatedOptimizer step against plain AdamW (dashed: 1.10× goal)")
    return _save(fig, name)


# ------------------------------------------------------------------------------------------ scripts
@dataclass
class Script:
    key: str
    file: str
    full: list[str]
    parse: Callable[[str], Table]
    plot: Callable[[Table, str], Path]
    threads_flag: str = "--threads"


SCRIPTS = [
    Script("covariance", "compare_covariance.py", [], parse_covariance, plot_covariance),
    Script(
        "eigen",
        "compare_eigen.py",
        "--sizes 512 1024 2048 --ks 8 32 128 --repeat 3 --lobpcg-max-d 1024 --torch-max-d 512".split(),
        parse_eigen,
        plot_eigen,
    ),
    Script("projection", "compare_projection.py", [], parse_projection, plot_projection),
    Script("calibration", "compare_calibration.py", [], parse_calibration, plot_calibration),
    Script("step", "compare_step.py", [], parse_step, plot_step),
]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return f"{cpu}, {os.cpu_count()} logical CPUs{load}"


def _versions() -> str:
    import numpy
    import scipy

    parts = [f"Python {platform.python_version()}", f"NumPy {numpy.__version__}"]
    parts.append(f"SciPy {scipy.__version__}")
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
    except ImportError:  # pragma: no cover - torch is a bench dependency
        pass
    return ", ".join(parts)


def run_script(s: Script, quick: bool, threads: int | None) -> tuple[str, list[str], float]:
    argv = [sys.executable, str(ROOT / "benchmarks" / s.file)]
    argv += ["--quick"] if quick else s.full
    if threads is not None:
        argv += [s.threads_flag, str(threads)]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 and not proc.stdout.strip():
        raise RuntimeError(f"{s.file} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    shown = ["python", f"benchmarks/{s.file}", *argv[2:]]
    return proc.stdout, shown, elapsed


def render(s: Script, out: str, command: list[str], elapsed: float, quick: bool) -> str:
    table = s.parse(out)
    img = f"bench_{s.key}.png"
    lines = [
        f"Command: `{' '.join(command)}` ({'quick smoke mode' if quick else 'full sizes'}, "
        f"{elapsed:.0f} s).",
        "",
    ]
    if table.rows and table.header:
        lines += [table.markdown(), ""]
        s.plot(table, img)
        lines += [f"![{s.key} benchmark plot](img/{img})", ""]
        if table.notes:
            lines += ["Settings and verdicts printed by the script:", "", "```text"]
            lines += [*table.notes, "```"]
    else:  # unparsed output is shown verbatim rather than lost
        lines += ["```text", out.rstrip(), "```"]
    return "\n".join(lines)


def replace_between(text: str, key: str, body: str) -> str:
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{PAGE}: markers {start} ... {end} not found")
    return pattern.sub(lambda _m: f"{start}\n{body}\n{end}", text)


# ----------------------------------------------------------------------------- the Concepts figure
def concepts_figure(path: Path | None = None) -> Path:
    """A 2-D pencil: the data, the generalized eigenvectors with their λ, a gated step, the gains."""
    import numpy as np

    from rqcore import gates, generalized_topk

    plt = _plt()
    rng = np.random.default_rng(0)

    def cov(angle: float, sx: float, sy: float) -> Any:
        c, s = np.cos(angle), np.sin(angle)
        R = np.array([[c, -s], [s, c]])
        return R @ np.diag([sx**2, sy**2]) @ R.T

    Cp = cov(np.deg2rad(20), 1.6, 0.35)  # pretraining proxy: elongated along ~20°
    Ct = cov(np.deg2rad(75), 1.3, 0.6)  # task: elongated along ~75°
    res = generalized_topk(Ct, Cp, 2, reg=1e-3, method="dense")
    lam, V = res.values, res.vectors
    M = Cp + 1e-3 * np.trace(Cp) / 2 * np.eye(2)
    xp = rng.multivariate_normal([0, 0], Cp, 300)
    xt = rng.multivariate_normal([0, 0], Ct, 300)

    vcol = ("tab:green", "tab:purple")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9))
    ax = axes[0]
    t = np.linspace(0, 2 * np.pi, 200)
    circle = np.stack([np.cos(t), np.sin(t)])
    ax.scatter(*xp.T, s=4, alpha=0.35, color="tab:blue", label="proxy inputs, C_p")
    ax.scatter(*xt.T, s=4, alpha=0.35, color="tab:orange", label="task inputs, C_t")
    for C, col in ((Cp, "tab:blue"), (Ct, "tab:orange")):
        ax.plot(*(np.linalg.cholesky(C) @ circle), color=col, lw=1.5)
    for j in range(2):
        v = V[:, j] / np.linalg.norm(V[:, j]) * 2.2
        ax.annotate("", v, (0, 0), arrowprops={"arrowstyle": "->", "lw": 2, "color": vcol[j]})
        ax.text(*(v * 1.12), f"v{j + 1}, λ{j + 1}={lam[j]:.2f}", color=vcol[j], ha="center")
    ax.set_title("inputs and generalized eigenvectors\nC_t v = λ (C_p + εI) v")
    ax.set_aspect("equal")
    ax.set_xlim(-3.2, 3.2)
    ax.set_ylim(-3.2, 3.2)
    ax.legend(loc="lower right", fontsize=7)

    ax = axes[1]
    tau = float(np.sqrt(lam[0] * lam[1]))  # halfway between the two in log scale
    g = gates.ratio(lam, tau=tau)
    c = np.array([0.7, 3.0])  # the step's coordinates (penalty Σc² mostly on v2)
    step = V @ c
    gated = V @ (g * c)
    assert np.allclose(V.T @ M @ step, c)  # c = Vᵀ M Δw: the spectral coordinates
    unit = np.linalg.cholesky(np.linalg.inv(M)) @ circle  # {w : wᵀMw = 1}
    lines = []
    for w, col, lab in ((step, "k", "step Δw"), (gated, "tab:red", "gated step Δw'")):
        pen, util = float(w @ M @ w), float(w @ Ct @ w)
        ax.annotate("", w, (0, 0), arrowprops={"arrowstyle": "->", "lw": 2, "color": col})
        ax.plot(*(unit * np.sqrt(pen)), color=col, lw=0.8, ls=":")
        lines.append((col, f"{lab}: penalty wᵀMw = {pen:.2f}, utility wᵀC_t w = {util:.2f}"))
    for j in range(2):
        for cj, ls in ((c[j], "--"), (g[j] * c[j], "-")):
            p = V[:, j] * cj
            ax.plot([0, p[0]], [0, p[1]], color=vcol[j], lw=1.2 if ls == "-" else 0.8, ls=ls)
        lines.append(
            (vcol[j], f"along v{j + 1}: c{j + 1} = {c[j]:.1f}, gain g{j + 1} = {g[j]:.2f}")
        )
    for i, (col, text) in enumerate(lines):
        ax.text(
            0.02, 0.98 - 0.065 * i, text, color=col, transform=ax.transAxes, va="top", fontsize=7
        )
    pts = np.stack([np.zeros(2), step, gated, V[:, 0] * c[0], V[:, 1] * c[1]], axis=1)
    lo, hi = pts.min(axis=1), pts.max(axis=1)
    span = float((hi - lo).max()) * 0.75
    mid = (lo + hi) / 2
    ax.set_xlim(mid[0] - span, mid[0] + span)
    ax.set_ylim(mid[1] - span, mid[1] + span * 1.4)
    ax.set_aspect("equal")
    ax.set_title("gating a step: c = Vᵀ M Δw, Δw' = V diag(g) c\n(dotted: penalty level sets)")

    ax = axes[2]
    lams = np.logspace(-2, 2, 300)
    ax.semilogx(lams, gates.ratio(lams, tau=tau), color="k", label="ratio λ/(λ+τ)")
    ax.semilogx(
        lams,
        gates.sigmoid(lams, tau=tau, temperature=0.5),
        "--",
        color="0.4",
        label="sigmoid, T=0.5",
    )
    ax.semilogx(lams, gates.threshold(lams, tau=tau), color="tab:brown", label="threshold 1[λ≥τ]")
    ax.semilogx(lams, gates.power(lams, alpha=0.5), color="tab:olive", label="power (λ/λmax)^0.5")
    ax.axvline(tau, color="0.5", ls=":", lw=1)
    ax.text(tau, 1.03, " τ", color="0.4")
    for j in range(2):
        ax.plot(lam[j], g[j], "o", color=vcol[j], label=f"v{j + 1}: ratio gain {g[j]:.2f}")
    ax.set_xlabel("λ (utility per unit penalty)")
    ax.set_ylabel("gain g(λ)")
    ax.set_title("gain functions (rqcore.gates)")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_ylim(-0.05, 1.12)
    fig.tight_layout()
    return _save(fig, (path or IMG / "concepts_pencil.png").name)


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run every script's --quick mode")
    parser.add_argument(
        "--only", nargs="+", choices=[s.key for s in SCRIPTS], help="run only these scripts"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="pass --threads N to every script"
    )
    parser.add_argument("--figures", action="store_true", help="only redraw the Concepts figure")
    args = parser.parse_args(argv)

    print(f"wrote {concepts_figure().relative_to(ROOT)}")
    if args.figures:
        return 0
    text = PAGE.read_text(encoding="utf-8")
    stamp = (
        f"Generated by `python benchmarks/make_docs_benchmarks.py{' --quick' if args.quick else ''}` "
        f"on {_dt.date.today().isoformat()}: {_machine()}; {_versions()}; "
        f"threads: {args.threads or 'each script’s default'}."
    )
    for s in SCRIPTS:
        if args.only and s.key not in args.only:
            continue
        print(f"running {s.file} ...", flush=True)
        out, command, elapsed = run_script(s, args.quick, args.threads)
        text = replace_between(text, s.key, render(s, out, command, elapsed, args.quick))
        print(f"  {elapsed:.1f} s", flush=True)
    text = replace_between(text, "meta", stamp)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
