"""Figures in the conventions of the lottery ticket papers.

The x axis is the percent of weights remaining on a log scale, inverted so the
dense network (100) is at the left, with ticks at the runs' densities labelled
like 100, 51.2, 26.2 (one decimal). Lines are means over replicates; bands are
± one standard deviation over replicates (sample std), as the legends say.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator  # noqa: E402

BAND_NOTE = "band: ± 1 std over replicates"
DPI = 110


def percent_label(density: float) -> str:
    """Percent of weights remaining with one decimal, the dense network as ``100``."""
    text = f"{100 * density:.1f}"
    return "100" if text == "100.0" else text


def density_ticks(densities, most: int = 12) -> list[float]:
    """The distinct densities, largest first, thinned to at most ``most`` ticks."""
    ticks = sorted({round(float(d), 6) for d in densities if d > 0}, reverse=True)
    if len(ticks) > most:
        step = -(-len(ticks) // most)
        ticks = ticks[::step]
    return ticks


def density_axis(ax, densities) -> None:
    """Log x axis of percent of weights remaining, 100 at the left."""
    ticks = density_ticks(densities)
    ax.set_xscale("log")
    if ticks:
        lo, hi = min(ticks), max(ticks)
        ax.set_xlim(hi * 1.08, lo / 1.08)  # inverted: dense at the left
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([percent_label(t) for t in ticks], rotation=45 if len(ticks) > 6 else 0)
    ax.set_xlabel("percent of weights remaining")
    ax.grid(True, alpha=0.3)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def metric_vs_density(series: list[dict], ylabel: str, title: str, path: Path) -> Path:
    """One line per series: ``{"label", "density", "mean", "std"}`` lists; a std band."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_d = []
    for s in series:
        d, m, sd = s["density"], s["mean"], s["std"]
        all_d += d
        (line,) = ax.plot(d, m, marker="o", ms=3.5, label=s["label"], ls=s.get("ls", "-"))
        lo = [a - b for a, b in zip(m, sd)]
        hi = [a + b for a, b in zip(m, sd)]
        ax.fill_between(d, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    density_axis(ax, all_d)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend(fontsize=8, title=BAND_NOTE, title_fontsize=7)
    return _save(fig, path)


def layer_density(levels: list[dict], layers: list[str], title: str, path: Path) -> Path:
    """Density of each layer against the overall density, one line per layer."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    d = [row["density"] for row in levels]
    for name in layers:
        ax.plot(d, [100 * row["layers"][name] for row in levels], marker="o", ms=3.5, label=name)
    density_axis(ax, d)
    ax.set_ylabel("percent of the layer's weights remaining")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def error_paths(paths: list[dict], title: str, path: Path) -> Path:
    """Test error along linear paths: ``{"label", "alpha", "error"}``."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in paths:
        ax.plot(p["alpha"], [100 * e for e in p["error"]], marker=".", label=p["label"])
    ax.set_xlabel("interpolation α (0: copy 1, 1: copy 2)")
    ax.set_ylabel("test error %")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if paths:
        ax.legend(fontsize=8)
    return _save(fig, path)


def instability_vs_rewind(series: list[dict], title: str, path: Path) -> Path:
    """Instability (error pp) against the rewind step: ``{"label", "k", "mean", "std"}``."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in series:
        (line,) = ax.plot(s["k"], [100 * v for v in s["mean"]], marker="o", label=s["label"])
        lo = [100 * (a - b) for a, b in zip(s["mean"], s["std"])]
        hi = [100 * (a + b) for a, b in zip(s["mean"], s["std"])]
        ax.fill_between(s["k"], lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    ax.axhline(2.0, color="gray", ls=":", lw=1, label="2% threshold")
    ax.set_xlabel("rewind step k")
    ax.set_ylabel("instability (error pp)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title=BAND_NOTE, title_fontsize=7)
    return _save(fig, path)


def metric_vs_x(
    series: list[dict],
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    integer_x: bool = False,
    log_x: bool = False,
) -> Path:
    """One line per series ``{"label", "x", "mean", "std"}`` on a linear x axis (e.g. the
    scale of input noise), with a std band; ``integer_x`` puts ticks on whole numbers,
    ``log_x`` makes the axis logarithmic (e.g. parameter counts)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if log_x:
        ax.set_xscale("log")
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for s in series:
        (line,) = ax.plot(s["x"], s["mean"], marker="o", ms=3.5, label=s["label"])
        lo = [a - b for a, b in zip(s["mean"], s["std"])]
        hi = [a + b for a, b in zip(s["mean"], s["std"])]
        ax.fill_between(s["x"], lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8, title=BAND_NOTE, title_fontsize=7)
    return _save(fig, path)


def heatmap(matrix: list[list[float]], labels: list[str], title: str, path: Path) -> Path:
    """A square matrix (e.g. Jaccard overlap between masks) with its values printed."""
    n = len(labels)
    size = max(4.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_yticklabels(labels, fontsize=7)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                v = matrix[i][j]
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v < 0.6 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title)
    return _save(fig, path)


def layer_reinit_bars(rows: list[dict], title: str, path: Path) -> Path:
    """Test accuracy with each layer re-initialised to its initial or to random values."""
    layers = [r["layer"] for r in rows if r["reset"] == "initial"]
    base = next((r["test_accuracy"] for r in rows if r["layer"] == "none"), None)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(layers) + 2), 4.5))
    width = 0.38
    for i, reset in enumerate(("initial", "random")):
        vals = [
            100 * next(r["test_accuracy"] for r in rows if r["layer"] == n and r["reset"] == reset)
            for n in layers
        ]
        ax.bar([j + (i - 0.5) * width for j in range(len(layers))], vals, width, label=reset)
    if base is not None:
        ax.axhline(100 * base, color="black", ls="--", lw=1, label="trained")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy %")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def fisher_curves(
    series: list[dict], layers: list[dict], marks: list[tuple[float, str]], path: Path
) -> Path:
    """The trace of the Fisher information against the step: ``series`` (one line per
    level, ``{"label", "step", "trace", "density"}``), ``layers`` (the dense level's
    trace per layer, same keys but no density) and ``marks`` (vertical lines at steps:
    an early-bird draw, stability rewind points)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    ds = sorted({s["density"] for s in series}, reverse=True)
    for s in series:
        shade = ds.index(s["density"]) / max(len(ds) - 1, 1)
        dense = s["density"] >= 1.0
        axes[0].plot(
            s["step"], s["trace"], marker="o", ms=2.5, lw=2 if dense else 1.2,
            color="black" if dense else cmap(0.9 * shade), label=s["label"],
        )  # fmt: skip
    for s in layers:
        axes[1].plot(s["step"], s["trace"], marker="o", ms=2.5, label=s["label"])
    styles = ["--", ":", "-."]
    kinds = list(dict.fromkeys(name.split(" ")[0] for _, name in marks))
    for ax in axes:
        for step, name in marks:
            ls = styles[kinds.index(name.split(" ")[0]) % len(styles)]
            ax.axvline(step, color="red", ls=ls, lw=1, alpha=0.7)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
    for step, name in marks:  # each mark named once, on the first panel
        axes[0].plot([], [], color="red", ls=styles[kinds.index(name.split(" ")[0]) % 3],
                     label=f"{name} (step {step:g})")  # fmt: skip
    axes[0].set_ylabel("trace of the Fisher information")
    axes[0].set_title("Fisher trace: dense level and tickets")
    axes[1].set_ylabel("trace of the Fisher information (per layer)")
    axes[1].set_title("Per layer, dense level")
    axes[0].legend(fontsize=7)
    if layers:
        axes[1].legend(fontsize=7)
    return _save(fig, path)


def dissection(levels: list[dict], layers: list[str], title: str, path: Path) -> Path:
    """Interpretable units and distinct concepts per layer against density, with test
    accuracy on a second y axis: ``levels`` rows ``{"density", "accuracy", "units":
    {layer: n}, "concepts": {layer: n}}``."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    d = [row["density"] for row in levels]
    for ax, key, ylabel in (
        (axes[0], "units", "interpretable units"),
        (axes[1], "concepts", "distinct concepts detected"),
    ):
        for name in layers:
            ax.plot(d, [row[key].get(name, 0) for row in levels], marker="o", ms=3.5, label=name)
        density_axis(ax, d)
        ax.set_ylabel(ylabel)
        twin = ax.twinx()
        twin.plot(d, [100 * row["accuracy"] for row in levels], color="black", ls="--",
                  marker="s", ms=3, label="test accuracy")  # fmt: skip
        twin.set_ylabel("test accuracy %")
        lines = ax.get_legend_handles_labels()
        extra = twin.get_legend_handles_labels()
        ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def double_descent(series: list[dict], title: str, path: Path) -> Path:
    """Test accuracy against density with the points of a double descent marked:
    ``series`` as :func:`metric_vs_density` takes, each with ``points`` (indices of the
    first error minimum, the error peak and the second error minimum) or None."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_d = []
    for s in series:
        d, m, sd = s["density"], s["mean"], s["std"]
        all_d += d
        (line,) = ax.plot(d, m, marker="o", ms=3.5, label=s["label"], ls=s.get("ls", "-"))
        lo = [a - b for a, b in zip(m, sd)]
        hi = [a + b for a, b in zip(m, sd)]
        ax.fill_between(d, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
        if s.get("points"):
            j, i, k = s["points"]
            ax.scatter([d[j], d[k]], [m[j], m[k]], marker="v", s=80, color=line.get_color(),
                       edgecolor="black", zorder=5)  # fmt: skip
            ax.scatter([d[i]], [m[i]], marker="^", s=80, facecolor="white",
                       edgecolor=line.get_color(), zorder=5)  # fmt: skip
    ax.scatter([], [], marker="v", color="gray", edgecolor="black", label="test-error minima")
    ax.scatter([], [], marker="^", facecolor="white", edgecolor="gray", label="error peak")
    density_axis(ax, all_d)
    ax.set_ylabel("test accuracy %")
    ax.set_title(title)
    ax.legend(fontsize=8, title=BAND_NOTE, title_fontsize=7)
    return _save(fig, path)
