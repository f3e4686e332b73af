"""Reports over run directories: PNG figures and one self-contained ``report.html``.

``build_report(run_dirs, out)`` reads each run's ``results.csv`` (and masks for
the per-layer densities) and writes:

- ``accuracy.png``: test accuracy against density, one line per run and
  variant, mean ± std over replicates; runs that differ only in their target
  density (a ``prune`` or ``dst`` sweep) are joined into one line per variant;
- ``early_stop.png``: the early-stop step (minimum validation loss) against density;
- ``layers-<run>.png``: per-layer density at each level of replicate 0;
- ``instability.png`` and ``paths-<run>.png`` for stability runs;
- ``tasks.png`` for SupSup runs: accuracy on each task (task id given) and with
  the id inferred, after each new task is learned;
- ``noise.png`` for noise-robustness runs: test accuracy against the noise
  level (the fraction of pixels set bright, or the Gaussian scale), one line per
  network;
- ``double_descent.png`` when a lottery run has label noise: tickets' test accuracy
  against density, with and without noise, the two test-error minima and the peak
  between them marked where a curve has them (He et al. 2022);
- ``fisher.png`` for runs with ``fisher.csv`` (``ticketlab fisher``): the Fisher trace
  against the step, dense level and tickets, per layer, early-bird draws and stability
  rewind points of the runs given marked;
- ``dissect-<run>.png`` for runs with ``dissect.csv`` (``ticketlab dissect``):
  interpretable units and concepts per layer against density, with test accuracy;
- ``parameters.png`` when a low-rank run is given: test accuracy against parameter
  count (a row's ``params``, else its nonzero parameters), one line per method and
  variant over all runs, so low-rank, magnitude and structured pruning share an axis;
- for topology searches (``wann``): ``wann-weights.png`` (the final network's test
  performance against the shared weight), ``wann-generations.png`` (performance and
  connections of each generation's best network), ``network-<run>-<r>.png`` (the final
  network by layer, coloured by activation) and, for the maze, ``maze-<run>.png`` (end
  points of all evaluated individuals, novelty against objective);
- ``report.html`` with every figure and the numbers behind it. A row is marked
  ``matching`` when its mean test accuracy is at least the dense network's mean
  minus one std over replicates (Frankle et al.).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..runs import write_text
from .html import render
from .search import wann_section
from .sections import (
    accuracy_section,
    continual_section,
    curve_groups,
    density_lines,
    dissect_section,
    diverged_section,
    double_descent_section,
    early_stop_section,
    fisher_figure,
    fisher_section,
    layer_section,
    load_runs,
    matching_threshold,
    mean_std,
    noise_section,
    parameters_section,
    raw_section,
    stability_section,
    summarize,
    sweep_section,
)

# methods whose runs have a meaningful early-stop iteration (IMP levels over training)
EARLY_STOP_METHODS = ("lottery", "train", "stability")


def build_report(run_dirs, out_dir, points: list[dict] | None = None) -> Path:
    """Write the figures and ``report.html`` under ``out_dir``; return the page's path.

    ``points`` (one per run directory: the flags a sweep set for it) makes it a sweep's
    report: runs named by what differs, and the sweep's table and lines first."""
    runs = load_runs(run_dirs)
    if points is not None:
        for r, p in zip(runs, points):
            r.label = ", ".join(f"{k}={v}" for k, v in p.items()) or r.label
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    searches = [r for r in runs if r.method == "wann"]
    runs = [r for r in runs if r.method != "wann"]
    summaries = {r.label: summarize(r) for r in runs}
    sections = [] if points is None or searches else [sweep_section(runs, points, out)]
    if searches:
        sections.append(wann_section(searches, out))
    if runs:
        sections.append(accuracy_section(runs, summaries, out))
    if any(r.method in EARLY_STOP_METHODS for r in runs):
        sections.append(early_stop_section(runs, summaries, out))
    layer = layer_section(runs, out)
    if layer is not None:
        sections.append(layer)
    stab = [r for r in runs if "instability" in r.columns]
    if stab:
        sections.append(stability_section(stab, out))
    noisy = [r for r in runs if "noise" in r.columns]
    if noisy:
        sections.append(noise_section(noisy, out))
    if any(r.method == "lowrank" for r in runs):
        sections.append(parameters_section(runs, out))
    continual = [r for r in runs if "eval_task" in r.columns]
    if continual:
        sections.append(continual_section(continual, out))
    for extra in (
        double_descent_section(runs, summaries, out),
        fisher_section(runs, out),
        dissect_section(runs, out),
    ):
        if extra is not None:
            sections.append(extra)
    failed = diverged_section(runs)
    if failed is not None:
        sections.insert(0, failed)
    sections.append(raw_section(runs + searches))
    intro = (
        "Runs: "
        + ", ".join(f"<code>{r.path}</code>" for r in runs + searches)
        + ". Lines are means over replicates; bands are ± 1 sample standard deviation."
        " <b>matching</b>: mean test accuracy at least the dense network's mean minus one"
        " standard deviation over replicates (Frankle et al.)."
    )
    page = out / "report.html"
    write_text(page, render("ticketlab report", intro, sections))
    return page


__all__ = [
    "build_report",
    "continual_section",
    "diverged_section",
    "fisher_figure",
    "curve_groups",
    "density_lines",
    "load_runs",
    "matching_threshold",
    "mean_std",
    "noise_section",
    "parameters_section",
    "summarize",
]
