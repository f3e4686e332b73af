"""The report section of topology searches (``ticketlab wann``): performance against the
shared weight, performance and size per generation, a drawing of the final network, and
for the maze the end points of every evaluated individual and novelty against objective."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..evolve.graph import ACTIVATIONS, Genome, depths
from ..runs import read_json
from .figures import DPI, plt
from .html import Section, Table

COLOURS = dict(zip(ACTIVATIONS, plt.get_cmap("tab10").colors))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


def draw_network(genome: Genome, title: str, path: Path) -> Path:
    """Nodes placed by layer (inputs left, outputs right), coloured by activation."""
    d = depths(genome)
    out_layer = max([d[v] for v in range(genome.n_nodes)] + [1]) + 1
    layer = [out_layer if v in genome.outputs else d[v] for v in range(genome.n_nodes)]
    pos = {}
    for lv in sorted(set(layer)):
        members = [v for v in range(genome.n_nodes) if layer[v] == lv]
        for i, v in enumerate(members):
            pos[v] = (lv, (i + 1) / (len(members) + 1))
    used = {v for e in genome.edges for v in e} | set(genome.outputs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, t in genome.edges:
        (x0, y0), (x1, y1) = pos[s], pos[t]
        ax.plot([x0, x1], [y0, y1], color="0.6", lw=0.7, zorder=1)
    shown = set()
    for v in sorted(used):
        act = ACTIVATIONS[genome.acts[v]]
        kind = "bias" if v == 0 else "input" if genome.is_source(v) else act
        colour = "0.2" if genome.is_source(v) else COLOURS[act]
        label = None if kind in shown else kind
        shown.add(kind)
        ax.scatter(*pos[v], s=60, color=colour, zorder=2, label=label, edgecolors="k")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    return _save(fig, path)


def _lines(ax, xs, ys, label):
    ax.plot(xs, ys, label=label)


def wann_section(runs, out: Path) -> Section:
    section = Section(
        "Weight-agnostic search",
        text="Performance of each generation's best network (mean and best over the shared "
        "weight values), its size, the final network's performance against the shared "
        "weight value on the test split, and the final network drawn by layer.",
    )
    fig_w, ax_w = plt.subplots(figsize=(6, 4))
    fig_g, (ax_p, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    table_rows = []
    maze_runs = []
    for run in runs:
        label = run.label
        spec = run.spec.get("spec", {})
        if spec.get("task") == "maze":
            maze_runs.append(run)
        for r in sorted({int(row["replicate"]) for row in run.rows}):
            rows = [x for x in run.rows if int(x["replicate"]) == r]
            search = [x for x in rows if x["variant"] == "search"]
            gens = [int(x["generation"]) for x in search]
            tag = f"{label} rep {r}"
            _lines(ax_p, gens, [float(x["mean_performance"]) for x in search], f"{tag} mean")
            ax_p.plot(gens, [float(x["best_performance"]) for x in search], ls="--", lw=0.8)
            _lines(ax_s, gens, [int(x["connections"]) for x in search], tag)
            final = run.path / f"replicate-{r}" / "final.json"
            if final.exists():
                done = read_json(final)
                curve = done.get("curve")
                if curve:
                    ax_w.plot(curve["weights"], curve["test"], marker=".", label=tag)
                if done.get("champion"):
                    png = draw_network(
                        Genome.from_json(done["champion"]),
                        f"{tag}: final network",
                        out / f"network-{_slug(label)}-{r}.png",
                    )
                    section.figures.append((png, f"{tag}: the final network by layer."))
            for x in rows:
                if x["variant"] != "search":
                    table_rows.append(
                        [
                            label,
                            str(r),
                            x["variant"],
                            f"{float(x['mean_performance']):.4g}",
                            f"{float(x['best_performance']):.4g}",
                            str(x.get("best_weight", "")),
                            str(x["connections"]),
                            str(x.get("solved", "")),
                        ]
                    )
    ax_w.set_xlabel("shared weight value")
    ax_w.set_ylabel("test performance")
    ax_w.set_title("Final network against the shared weight")
    ax_w.grid(True, alpha=0.3)
    ax_w.legend(fontsize=7)
    ax_p.set_xlabel("generation")
    ax_p.set_ylabel("performance (solid: mean, dashed: best over weights)")
    ax_s.set_xlabel("generation")
    ax_s.set_ylabel("connections of the best network")
    for ax in (ax_p, ax_s):
        ax.grid(True, alpha=0.3)
    ax_p.legend(fontsize=7)
    section.figures.insert(
        0, (_save(fig_w, out / "wann-weights.png"), "Test performance at each shared weight.")
    )
    section.figures.insert(
        1, (_save(fig_g, out / "wann-generations.png"), "Per generation: performance and size.")
    )
    cols = ["run", "rep", "variant", "mean perf", "best perf", "best weight", "conns", "solved"]
    section.tables.append(Table("after the search (test split)", cols, table_rows))
    if maze_runs:
        section.figures += maze_figures(maze_runs, out)
    return section


def maze_figures(runs, out: Path) -> list[tuple[Path, str]]:
    """End points of every evaluated individual over the maze walls, and novelty against
    objective, one panel per run."""
    from ..evolve.tasks import MAZE, MEDIUM_WALLS

    figs = []
    for run in runs:
        fig, (ax_m, ax_n) = plt.subplots(1, 2, figsize=(11, 3.6))
        for (x0, y0), (x1, y1) in MEDIUM_WALLS:
            ax_m.plot([x0, x1], [y0, y1], color="k", lw=1.5)
        pts, perf, nov = [], [], []
        for path in sorted(run.path.glob("replicate-*/generations/gen-*.json")):
            g = json.loads(path.read_text())
            pts.append(np.asarray(g["endpoints"]).reshape(-1, 2))
            perf += g["mean_performance"]
            nov += g["novelty"]
        if pts:
            p = np.concatenate(pts)
            ax_m.scatter(p[:, 0], p[:, 1], s=2, alpha=0.3)
        ax_m.scatter(*MAZE["start"], marker="s", color="g", label="start")
        ax_m.scatter(*MAZE["goal"], marker="*", s=120, color="r", label="goal")
        ax_m.set_aspect("equal")
        ax_m.set_title(f"{run.label}: end points")
        ax_m.legend(fontsize=7)
        ax_n.scatter(perf, nov, s=3, alpha=0.4)
        ax_n.set_xlabel("objective (300 - distance to goal, mean over weights)")
        ax_n.set_ylabel("novelty")
        ax_n.grid(True, alpha=0.3)
        png = _save(fig, out / f"maze-{_slug(run.label)}.png")
        figs.append(
            (png, f"{run.label}: maze end points of all individuals; novelty vs objective.")
        )
    return figs


__all__ = ["draw_network", "maze_figures", "wann_section"]
