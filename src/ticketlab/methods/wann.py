"""Weight-agnostic topology search (Gaier & Ha 2019) with objective, novelty (Lehman &
Stanley 2011) or combined selection.

Every connection of a network carries one shared weight; a network is scored at each of
the shared values (``weight_values``) and ranked on its mean and best performance over
them and on its connection count. A generation: evaluate, rank, keep the elite, breed
the rest by tournament and one mutation each. After the last generation the champion
(best mean performance, fewest connections on a tie) is scored on held-out data or new
episodes, beside a random topology of the same size, individual random weights, and on
request a tuned shared weight and individually trained weights.

Run directory::

    replicate-<r>/state.json             population, rows so far (the resume point) and
                                          archive-<g>.safetensors, the novelty archive
    replicate-<r>/generations/gen-<g>.json  the generation's best network (nodes, edges,
                                          activations) and every individual's scores,
                                          novelty and (maze) end points
    replicate-<r>/final.json             the champion, the baselines and the performance
                                          against the shared weight value

``results.csv`` columns: one ``search`` row per generation (``generation``,
``mean_performance`` and ``best_performance`` over the shared weights for the
generation's best network, its ``connections`` and ``nodes``, ``solved`` for the maze:
whether any individual ended at the goal, ``novelty_mean``, ``archive_size``), then one
row per final variant on the test split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data import load as load_data
from ..errors import RunInterrupted, UsageError
from ..evolve.graph import Genome, minimal, mutate, random_topology
from ..evolve.novelty import Archive, novelty
from ..evolve.ranking import pareto_rank, tournament, wann_rank
from ..evolve.tasks import CLASSIFICATION, TASKS, Classification, Maze, SwingUp
from ..experiment import Experiment
from ..runs import atomic_path, open_run, read_json, write_json
from ..spec import Spec, identity, resolved_dict, spec_hash, unhashed_fields
from ..train import stop_requested

SELECTIONS = ("objective", "novelty", "both")
FITNESS = ("cross_entropy", "accuracy")
COLUMNS = [
    "method",
    "replicate",
    "level",
    "variant",
    "generation",
    "split",
    "mean_performance",
    "best_performance",
    "std_performance",
    "mean_fitness",
    "best_weight",
    "connections",
    "nodes",
    "solved",
    "novelty_mean",
    "archive_size",
    "evaluations",
    "seconds",
    "status",
]
# task defaults: initial connection density (Gaier & Ha's 5% for images), novelty archive
# threshold (Lehman & Stanley's 6 maze units; for probe patterns sqrt(2) is one changed
# prediction), episode length (swing-up 1000 steps, maze 400), gradient steps of
# --train-weights
TASK_DEFAULTS = {
    "xor": dict(init_density=0.5, archive_threshold=1.0, episode_steps=0, train_steps=300),
    "mnist1d": dict(init_density=0.05, archive_threshold=2.0, episode_steps=0, train_steps=300),
    "fashion_mnist": dict(
        init_density=0.05, archive_threshold=2.0, episode_steps=0, train_steps=300
    ),
    "swingup": dict(init_density=0.5, archive_threshold=0.1, episode_steps=1000, train_steps=50),
    "maze": dict(init_density=0.5, archive_threshold=6.0, episode_steps=400, train_steps=0),
}


@dataclass(frozen=True)
class WannSpec(Spec):
    """Knobs of ``ticketlab wann`` on top of :class:`Spec` (whose training knobs are
    unused; ``seed``, ``replicates``, ``runs_dir`` and ``quiet`` are)."""

    SETUP = (
        "Gaier & Ha 2019 (WANNRelease): shared weights -2,-1,-0.5,0.5,1,2; one mutation per "
        "child, add node 0.25 / add connection 0.20 / change activation 0.50; Pareto rank on "
        "mean performance and, with probability 0.8, connections, else best performance; "
        "20% elite, 20% culled, tournament selection; novelty after Lehman & Stanley 2011 "
        "(k=15, archive threshold 6 on the medium maze, 400 steps)"
    )
    EXTENDS = frozenset({"generations", "tune_weight", "train_weights"})

    method: str = "wann"
    model: str = "wann"
    task: str = "xor"
    population: int = 64
    generations: int = 20
    selection: str = "objective"
    weight_values: tuple[float, ...] = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
    init_density: float | None = None  # None: the task's default
    p_connections: float = 0.8
    elite_ratio: float = 0.2
    cull_ratio: float = 0.2
    tournament_size: int = 8
    novelty_k: int = 15
    archive_threshold: float | None = None  # None: the task's default
    archive_size: int = 250
    eval_examples: int = 1000
    fitness: str = "accuracy"  # classification: what selection maximises (or cross_entropy)
    probe_examples: int = 32
    image_size: int = 16  # fashion_mnist downsampled as the paper's 16x16 MNIST
    episode_steps: int | None = None  # None: the task's default
    trials: int = 1
    test_trials: int = 20
    random_draws: int = 20
    tune_weight: bool = False
    tune_points: int = 40
    train_weights: bool = False
    train_steps: int | None = None  # None: the task's default (300; swingup 50, each a rollout)
    train_lr: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise UsageError(f"unknown task '{self.task}'; choose from: {', '.join(TASKS)}")
        if self.selection not in SELECTIONS:
            raise UsageError(
                f"unknown selection '{self.selection}'; choose from: {', '.join(SELECTIONS)}"
            )
        object.__setattr__(self, "dataset", self.task)
        object.__setattr__(self, "weight_values", tuple(float(w) for w in self.weight_values))
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        checks = [
            (self.population >= 4, f"population must be >= 4; got {self.population}"),
            (self.generations >= 1, f"generations must be >= 1; got {self.generations}"),
            (len(self.weight_values) >= 1, "give at least one shared weight value"),
            (
                0 < self.init_density <= 1,
                f"init density must be in (0, 1]; got {self.init_density}",
            ),
            (0 <= self.elite_ratio < 1 and 0 <= self.cull_ratio < 1, "ratios must be in [0, 1)"),
            (self.tournament_size >= 1, "tournament size must be >= 1"),
            (self.novelty_k >= 1 and self.archive_size >= 0, "novelty k >= 1, archive size >= 0"),
            (self.eval_examples >= 1 and self.trials >= 1 and self.test_trials >= 1, "counts >= 1"),
            (self.tune_points >= 2 and self.random_draws >= 1, "tune points >= 2, draws >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.fitness not in FITNESS:
            raise UsageError(f"unknown fitness '{self.fitness}'; choose from: {', '.join(FITNESS)}")
        if self.train_weights and self.task == "maze":
            raise UsageError(
                "--train-weights needs a differentiable task (classification or swingup); "
                "the maze's collisions are not"
            )


def make_task(spec: WannSpec, data=None):
    if spec.task in CLASSIFICATION:
        data = data or load_data(spec.task, data_dir=spec.data_dir, split_seed=spec.seed)
        return Classification(
            data, spec.eval_examples, spec.probe_examples, spec.image_size, spec.fitness
        )
    if spec.task == "swingup":
        return SwingUp(spec.episode_steps, spec.trials, spec.test_trials)
    return Maze(spec.episode_steps)


class WannExperiment(Experiment):
    """A weight-agnostic search bound to ``<runs-dir>/wann-<hash12>``."""

    def __init__(self, spec: WannSpec, data=None, model_fn=None, model_id=None):
        self.spec = spec
        self.spe = 1  # no epochs here: step strings are unused
        self.identity = identity(spec, self.spe)
        if data is not None:
            self.identity["dataset"] = f"{data.name}:{len(data.y_train)}"
        self.hash = spec_hash(self.identity)
        self.task = make_task(spec, data)  # loads the data: bad input fails before writing
        self.dir = open_run(
            spec.runs_dir,
            spec.method,
            self.hash,
            self.identity,
            resolved_dict(spec, self.spe),
            unhashed_fields(spec),
        )

    def run(self, progress=None) -> list[dict]:
        super().run(progress)
        return self.rows()

    def rows(self) -> list[dict]:
        rows = []
        for r in range(self.spec.replicates):
            rdir = self.dir / f"replicate-{r}"
            if (rdir / "state.json").exists():
                rows += read_json(rdir / "state.json")["rows"]
            if (rdir / "final.json").exists():
                rows += read_json(rdir / "final.json")["rows"]
        return rows

    # the search -------------------------------------------------------------------
    def _initial(self, r: int) -> dict:
        spec, task = self.spec, self.task
        rng = np.random.default_rng(self.seed(r, "population"))
        pop = [
            minimal(task.n_in, task.n_out, task.out_act, spec.init_density, rng)
            for _ in range(spec.population)
        ]
        return {
            "generation": 0,
            "population": [g.to_json() for g in pop],
            "archive": {"threshold": spec.archive_threshold, "file": None},
            "rows": [],
        }

    def _load_archive(self, rdir, meta: dict) -> Archive:
        entries = None
        if meta.get("file"):
            entries = load_file(rdir / meta["file"])["entries"].numpy()
        return Archive(meta["threshold"], self.spec.archive_size, entries=entries)

    def _save_archive(self, rdir, archive: Archive, generation: int) -> dict:
        """The archive's behaviours as safetensors, named by the generation that reads them
        (so the state file never points at a newer archive than its population)."""
        name = f"archive-{generation:04d}.safetensors"
        with atomic_path(rdir / name) as tmp:
            save_file({"entries": torch.from_numpy(np.ascontiguousarray(archive.entries))}, tmp)
        return {"threshold": archive.threshold, "file": name}

    def _rank(self, mean, best, conns, nov, rng) -> np.ndarray:
        sel = self.spec.selection
        if sel == "objective":
            return wann_rank(mean, best, conns, rng, self.spec.p_connections)
        if sel == "novelty":
            rank = np.empty(len(nov), dtype=int)
            rank[np.argsort(-nov, kind="stable")] = np.arange(len(nov))
            return rank
        return pareto_rank(np.c_[mean, nov])

    def _breed(self, pop: list[Genome], rank: np.ndarray, rng) -> list[Genome]:
        spec = self.spec
        order = np.argsort(rank, kind="stable")
        n_elite = int(spec.elite_ratio * len(pop))
        pool = order[: max(1, len(pop) - int(spec.cull_ratio * len(pop)))]
        children = [pop[int(i)].copy() for i in order[:n_elite]]
        while len(children) < len(pop):
            parent = pop[tournament(rank, pool, spec.tournament_size, rng)]
            children.append(mutate(parent, rng))
        return children

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec, task = self.spec, self.task
        rdir = self.dir / f"replicate-{r}"
        state_path = rdir / "state.json"
        state = read_json(state_path) if state_path.exists() else self._initial(r)
        weights = np.asarray(spec.weight_values)
        bar = None
        if progress is not None and state["generation"] < spec.generations:
            bar = progress.add_task(
                f"rep {r} {spec.task} {spec.selection}",
                total=spec.generations,
                completed=state["generation"],
            )
        while state["generation"] < spec.generations:
            g = state["generation"]
            started = time.perf_counter()
            pop = [Genome.from_json(d) for d in state["population"]]
            archive = self._load_archive(rdir, state["archive"])
            ev = task.evaluate(pop, weights, seed=self.seed(r, f"evaluate-{g}"))
            mean, best = ev.performance.mean(1), ev.performance.max(1)
            fit_mean, fit_best = ev.fitness.mean(1), ev.fitness.max(1)
            conns = np.array([len(p.edges) for p in pop])
            nov = novelty(ev.behaviour, archive.entries, spec.novelty_k)
            archive.add(ev.behaviour, nov)
            rng = np.random.default_rng(self.seed(r, f"generation-{g}"))
            rank = self._rank(fit_mean, fit_best, conns, nov, rng)
            champ = int(np.lexsort((conns, -fit_mean))[0])
            solved = bool(ev.solved.any()) if ev.solved is not None else ""
            record = {
                "generation": g,
                "best": pop[champ].to_json(),
                "best_index": champ,
                "best_performance_by_weight": ev.performance[champ].tolist(),
                "weights": weights.tolist(),
                "mean_performance": mean.tolist(),
                "best_performance": best.tolist(),
                "connections": conns.tolist(),
                "mean_fitness": fit_mean.tolist(),
                "novelty": nov.tolist(),
                "rank": rank.tolist(),
            }
            if ev.endpoints is not None:
                record["endpoints"] = ev.endpoints.tolist()
            write_json(rdir / "generations" / f"gen-{g:04d}.json", record)
            row = {
                "method": spec.method,
                "replicate": r,
                "level": 0,
                "variant": "search",
                "generation": g,
                "split": "train",
                "mean_performance": float(mean[champ]),
                "best_performance": float(best[champ]),
                "std_performance": float(ev.performance[champ].std()),
                "mean_fitness": float(fit_mean[champ]),
                "best_weight": float(weights[int(np.argmax(ev.performance[champ]))]),
                "connections": int(conns[champ]),
                "nodes": pop[champ].n_nodes,
                "solved": solved,
                "novelty_mean": float(nov.mean()),
                "archive_size": len(archive),
                "evaluations": (g + 1) * len(pop) * len(weights),
                "seconds": round(time.perf_counter() - started, 3),
                "status": "done",
            }
            children = self._breed(pop, rank, rng)
            previous = state["archive"].get("file")
            state = {
                "generation": g + 1,
                "population": [c.to_json() for c in children],
                "archive": self._save_archive(rdir, archive, g + 1),
                "rows": state["rows"] + [row],
            }
            write_json(state_path, state)
            if previous and previous != state["archive"]["file"]:
                (rdir / previous).unlink(missing_ok=True)
            self.write_results(self.rows(), COLUMNS)
            if bar is not None:
                progress.update(bar, completed=g + 1)
            if stop_requested() and state["generation"] < spec.generations:
                raise RunInterrupted(f"stopped after generation {g} of replicate {r}")
        if bar is not None:
            progress.update(bar, visible=False)
        self._final(r, rdir)
        self.write_results(self.rows(), COLUMNS)

    # after the search -------------------------------------------------------------
    def _final(self, r: int, rdir) -> None:
        spec, task = self.spec, self.task
        wanted = ["wann", "random-topology", "random-weights"]
        if spec.task in CLASSIFICATION:
            wanted.insert(1, "ensemble")
        if spec.tune_weight:
            wanted.append("tuned-weight")
        if spec.train_weights:
            wanted.append("trained-weights")
        path = rdir / "final.json"
        done = read_json(path) if path.exists() else None
        if done is not None and done["generations"] != spec.generations:
            done = None  # the search was extended: a new champion
        have = {row["variant"]: row for row in done["rows"]} if done else {}
        if all(v in have for v in wanted):
            return
        last = read_json(rdir / "generations" / f"gen-{spec.generations - 1:04d}.json")
        champ = Genome.from_json(last["best"])
        weights = np.asarray(spec.weight_values)
        extra = dict(done or {})
        grid = np.linspace(-2.0, 2.0, spec.tune_points + 1)
        grid = grid[np.abs(grid) > 1e-9]
        if "curve" not in extra:  # performance against the shared weight, for the report
            extra["curve"] = {"weights": grid.tolist(), "test": _floats(task.score(champ, grid))}

        def row(variant, perf, best_weight, g=champ):
            perf = np.atleast_1d(np.asarray(perf, dtype=float))
            solved = bool((perf >= 295.0).any()) if spec.task == "maze" else ""
            return {
                "method": spec.method,
                "replicate": r,
                "level": 0,
                "variant": variant,
                "generation": spec.generations,
                "split": "test",
                "mean_performance": float(perf.mean()),
                "best_performance": float(perf.max()),
                "std_performance": float(perf.std()),
                "best_weight": best_weight,
                "connections": len(g.edges),
                "nodes": g.n_nodes,
                "solved": solved,
                "status": "done",
            }

        rows = dict(have)
        torch_gen = torch.Generator().manual_seed(self.seed(r, "random-weights") % (2**62))
        if "wann" not in rows:
            perf = task.score(champ, weights)
            rows["wann"] = row("wann", perf, float(weights[int(np.argmax(perf))]))
            extra["champion"] = champ.to_json()
        if "ensemble" in wanted and "ensemble" not in rows:
            rows["ensemble"] = row("ensemble", task.score(champ, weights, ensemble=True), "")
        if "random-topology" not in rows:
            rand = random_topology(champ, np.random.default_rng(self.seed(r, "random-topology")))
            perf = task.score(rand, weights)
            rows["random-topology"] = row(
                "random-topology", perf, float(weights[int(np.argmax(perf))]), rand
            )
            extra["random_topology"] = rand.to_json()
        if "random-weights" not in rows:
            ew = torch.rand(spec.random_draws, len(champ.edges), generator=torch_gen) * 4 - 2
            rows["random-weights"] = row("random-weights", task.score_edges(champ, ew), "")
        tuned = None
        if "tuned-weight" in wanted:
            train_perf = task.score(champ, grid, split="train")
            tuned = float(grid[int(np.argmax(train_perf))])
            if "tuned-weight" not in rows:
                rows["tuned-weight"] = row(
                    "tuned-weight", task.score(champ, np.array([tuned])), tuned
                )
        if "trained-weights" in wanted and "trained-weights" not in rows:
            start = tuned if tuned is not None else rows["wann"]["best_weight"]
            init = torch.full((len(champ.edges),), float(start))
            trained = task.train_weights(
                champ, init, spec.train_steps, spec.train_lr, self.seed(r, "train") % (2**31)
            )
            rows["trained-weights"] = row(
                "trained-weights", task.score_edges(champ, trained), float(start)
            )
            extra["trained_weights"] = trained.reshape(-1).tolist()
        order = [v for v in wanted if v in rows]
        extra.update(generations=spec.generations, rows=[rows[v] for v in order])
        write_json(path, extra)


def _floats(values) -> list[float]:
    return [float(v) for v in np.atleast_1d(values)]


__all__ = ["COLUMNS", "SELECTIONS", "WannExperiment", "WannSpec", "make_task"]
