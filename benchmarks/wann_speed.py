"""One generation of a weight-agnostic search: the population's vectorised pass against
scoring one network at a time.

Builds a population of mutated networks on mnist1d (1000 examples, the six shared
weights), then times ``Classification.evaluate`` on the whole population (one flat
graph, one torch pass per layer) and the same networks evaluated one by one, and prints
seconds per generation and the ratio. Also one swing-up generation (1000 steps, all
networks and weights stepped together)."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ticketlab.data import load
from ticketlab.evolve.graph import minimal, mutate
from ticketlab.evolve.tasks import Classification, SwingUp

WEIGHTS = np.array([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])


def population(n_in, n_out, act, size, mutations, seed=0):
    rng = np.random.default_rng(seed)
    pop = [minimal(n_in, n_out, act, 0.05, rng) for _ in range(size)]
    for _ in range(mutations):
        pop = [mutate(g, rng) for g in pop]
    return pop


def timed(fn, rounds):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--mutations", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task = Classification(load("mnist1d"), 1000, 32, None)
    for size in (int(s) for s in args.sizes.split(",")):
        pop = population(task.n_in, task.n_out, "linear", size, args.mutations)
        whole = timed(lambda pop=pop: task.evaluate(pop, WEIGHTS, 1), args.rounds)
        each = timed(lambda pop=pop: [task.evaluate([g], WEIGHTS, 1) for g in pop], args.rounds)
        conns = np.mean([len(g.edges) for g in pop])
        print(
            f"mnist1d P={size} ({conns:.0f} connections each): population {whole:.3f} s, "
            f"one at a time {each:.3f} s, ratio {each / whole:.1f}x"
        )
    swing = SwingUp(1000, 1, 1)
    pop = population(5, 1, "tanh", 64, args.mutations)
    t = timed(lambda: swing.evaluate(pop, WEIGHTS, 1), 1)
    print(f"swingup P=64, 6 weights, 1000 steps: one generation {t:.2f} s")


if __name__ == "__main__":
    main()
