"""Feed-forward network graphs for topology search: the genome, its mutations, and the
evaluation of a whole population over shared weight values in one torch pass per layer.

Node ids: 0 is the bias (always 1), ``1..n_in`` the inputs, the next ``n_out`` the
outputs, then hidden nodes in order of creation. Every connection carries the same
weight (Gaier & Ha 2019), or, for weight training, one weight each.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

# Gaier & Ha's activation set (WANNRelease ann.py: sin and cos take pi * x, sigmoid is
# (tanh(x/2)+1)/2, "inverse" is -x, step is 1 where x > 0)
ACTIVATIONS = (
    "linear",
    "step",
    "sin",
    "cos",
    "gaussian",
    "tanh",
    "sigmoid",
    "inverse",
    "abs",
    "relu",
)
ACT_FN = {
    "linear": lambda x: x,
    "step": lambda x: (x > 0).to(x.dtype),
    "sin": lambda x: torch.sin(torch.pi * x),
    "cos": lambda x: torch.cos(torch.pi * x),
    "gaussian": lambda x: torch.exp(-x * x / 2),
    "tanh": torch.tanh,
    "sigmoid": lambda x: (torch.tanh(x / 2) + 1) / 2,
    "inverse": lambda x: -x,
    "abs": torch.abs,
    "relu": torch.relu,
}
# Gaier & Ha's mutation rates (WANNRelease p/*.json): the reference's re-enabling of a
# disabled connection (5%) has nothing to act on here, where a split connection is removed
MUTATION_RATES = {"add_node": 0.25, "add_connection": 0.20, "change_activation": 0.50}


@dataclass
class Genome:
    """A feed-forward graph: one activation per node and a list of connections."""

    n_in: int
    n_out: int
    acts: list[int]  # index into ACTIVATIONS, one per node (bias and inputs: linear)
    edges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n_nodes(self) -> int:
        return len(self.acts)

    @property
    def outputs(self) -> range:
        return range(self.n_in + 1, self.n_in + 1 + self.n_out)

    @property
    def hidden(self) -> range:
        return range(self.n_in + 1 + self.n_out, self.n_nodes)

    def is_source(self, v: int) -> bool:  # bias or input
        return v <= self.n_in

    def copy(self) -> Genome:
        return copy.deepcopy(self)

    def to_json(self) -> dict:
        return {
            "n_in": self.n_in,
            "n_out": self.n_out,
            "nodes": [{"id": i, "activation": ACTIVATIONS[a]} for i, a in enumerate(self.acts)],
            "edges": [list(e) for e in self.edges],
        }

    @classmethod
    def from_json(cls, d: dict) -> Genome:
        acts = [ACTIVATIONS.index(n["activation"]) for n in d["nodes"]]
        return cls(d["n_in"], d["n_out"], acts, [tuple(e) for e in d["edges"]])


def minimal(n_in: int, n_out: int, out_act: str, density: float, rng: np.random.Generator):
    """Gaier & Ha's start: bias and inputs wired straight to the outputs, each connection
    present with probability ``density`` (at least one), no hidden nodes."""
    acts = [0] * (n_in + 1) + [ACTIVATIONS.index(out_act)] * n_out
    pairs = [(s, n_in + 1 + o) for o in range(n_out) for s in range(n_in + 1)]
    keep = rng.random(len(pairs)) < density
    if not keep.any():
        keep[rng.integers(len(pairs))] = True
    return Genome(n_in, n_out, acts, [p for p, k in zip(pairs, keep) if k])


def descendants(g: Genome, v: int) -> set[int]:
    """Nodes reachable from ``v`` (``v`` included)."""
    out: dict[int, list[int]] = {}
    for s, d in g.edges:
        out.setdefault(s, []).append(d)
    seen, stack = {v}, [v]
    while stack:
        for w in out.get(stack.pop(), ()):
            if w not in seen:
                seen.add(w)
                stack.append(w)
    return seen


def topological_order(g: Genome) -> list[int]:
    """Kahn's algorithm; raises ValueError on a cycle."""
    indeg = [0] * g.n_nodes
    out: dict[int, list[int]] = {}
    for s, d in g.edges:
        indeg[d] += 1
        out.setdefault(s, []).append(d)
    ready = [v for v in range(g.n_nodes) if indeg[v] == 0]
    order = []
    while ready:
        v = ready.pop()
        order.append(v)
        for w in out.get(v, ()):
            indeg[w] -= 1
            if indeg[w] == 0:
                ready.append(w)
    if len(order) != g.n_nodes:
        raise ValueError("the graph has a cycle")
    return order


def depths(g: Genome) -> list[int]:
    """Layer of each node: 0 for bias and inputs, else 1 + the deepest source feeding it
    (1 for a node nothing feeds: it reads 0)."""
    inputs: dict[int, list[int]] = {}
    for s, d in g.edges:
        inputs.setdefault(d, []).append(s)
    depth = [0] * g.n_nodes
    for v in topological_order(g):
        if not g.is_source(v):
            depth[v] = 1 + max((depth[s] for s in inputs.get(v, ())), default=0)
    return depth


# mutations ----------------------------------------------------------------------


def add_node(g: Genome, rng: np.random.Generator) -> bool:
    """Split a connection s->d into s->h->d with a new hidden node h of random activation."""
    if not g.edges:
        return False
    s, d = g.edges.pop(int(rng.integers(len(g.edges))))
    h = g.n_nodes
    g.acts.append(int(rng.integers(len(ACTIVATIONS))))
    g.edges += [(s, h), (h, d)]
    return True


def add_connection(g: Genome, rng: np.random.Generator) -> bool:
    """Connect two unconnected nodes without closing a cycle: the source may not be
    reachable from the destination."""
    existing = set(g.edges)
    dsts = [*g.outputs, *g.hidden]
    for d in rng.permutation(dsts):
        d = int(d)
        below = descendants(g, d)
        srcs = [
            s for s in (*range(g.n_in + 1), *g.hidden) if s not in below and (s, d) not in existing
        ]
        if srcs:
            g.edges.append((srcs[int(rng.integers(len(srcs)))], d))
            return True
    return False


def change_activation(g: Genome, rng: np.random.Generator) -> bool:
    """Give a hidden node another activation."""
    hidden = list(g.hidden)
    if not hidden:
        return False
    v = hidden[int(rng.integers(len(hidden)))]
    others = [a for a in range(len(ACTIVATIONS)) if a != g.acts[v]]
    g.acts[v] = others[int(rng.integers(len(others)))]
    return True


MUTATIONS = {
    "add_node": add_node,
    "add_connection": add_connection,
    "change_activation": change_activation,
}


def mutate(g: Genome, rng: np.random.Generator, rates: dict | None = None) -> Genome:
    """A mutated copy: one operator chosen by roulette over ``rates``; if it cannot act
    (no hidden node to change) the next one that can is used."""
    rates = rates or MUTATION_RATES
    names = list(rates)
    p = np.array([rates[n] for n in names], dtype=float)
    child = g.copy()
    first = int(rng.choice(len(names), p=p / p.sum()))
    for i in range(len(names)):
        if MUTATIONS[names[(first + i) % len(names)]](child, rng):
            break
    return child


def random_topology(like: Genome, rng: np.random.Generator) -> Genome:
    """A random feed-forward graph with ``like``'s inputs, outputs (and their activations),
    number of hidden nodes and number of connections: hidden activations drawn at random,
    connections drawn uniformly among those that keep a random node order acyclic."""
    hidden = len(like.hidden)
    acts = list(like.acts[: like.n_in + 1 + like.n_out])
    acts += [int(a) for a in rng.integers(len(ACTIVATIONS), size=hidden)]
    g = Genome(like.n_in, like.n_out, acts, [])
    order = {v: i for i, v in enumerate(rng.permutation(list(g.hidden)).tolist())}
    rank = [
        -1 if g.is_source(v) else (hidden if v in g.outputs else order[v]) for v in range(g.n_nodes)
    ]
    pairs = [
        (s, d)
        for s in (*range(g.n_in + 1), *g.hidden)
        for d in (*g.outputs, *g.hidden)
        if rank[s] < rank[d]
    ]
    take = rng.choice(len(pairs), size=min(len(like.edges), len(pairs)), replace=False)
    g.edges = [pairs[int(i)] for i in sorted(take)]
    return g


# evaluation ---------------------------------------------------------------------


@dataclass
class Compiled:
    """A population laid out as one flat graph: ``layers`` holds, per depth, the global
    ids of its nodes, the connections into them (sources, positions among the layer's
    nodes, connection index) and the layer's nodes grouped by activation."""

    n_nodes: int
    input_index: torch.Tensor  # shared: (n_in+1,) ; per genome: (P, n_in+1)
    output_index: torch.Tensor  # (P, n_out)
    layers: list[tuple]
    shared_inputs: bool
    n_edges: int


def compile_population(genomes: list[Genome], shared_inputs: bool = True) -> Compiled:
    """Lay ``genomes`` out as one graph. With ``shared_inputs`` all read the same input
    nodes (a classification batch); otherwise each has its own (a control episode)."""
    n_in = genomes[0].n_in
    total = n_in + 1 if shared_inputs else 0
    ins, outs, nodes, src, dst = [], [], [], [], []
    for g in genomes:
        d = depths(g)
        start = total
        if shared_inputs:
            gid = list(range(n_in + 1)) + list(range(start, start + g.n_nodes - n_in - 1))
            total += g.n_nodes - n_in - 1
        else:
            gid = list(range(start, start + g.n_nodes))
            total += g.n_nodes
            ins.append(gid[: n_in + 1])
        outs.append([gid[v] for v in g.outputs])
        nodes += [(gid[v], d[v], g.acts[v]) for v in range(n_in + 1, g.n_nodes)]
        src += [gid[s] for s, _ in g.edges]
        dst += [gid[t] for _, t in g.edges]
    depth_of = {v: dd for v, dd, _ in nodes}
    src_t, dst_t = torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)
    edge_depth = torch.tensor([depth_of[t] for t in dst], dtype=torch.long)
    layers = []
    for level in sorted({dd for _, dd, _ in nodes}):
        members = [(v, a) for v, dd, a in nodes if dd == level]
        ids = torch.tensor([v for v, _ in members], dtype=torch.long)
        pos = torch.full((total,), -1, dtype=torch.long)
        pos[ids] = torch.arange(len(ids))
        sel = (edge_depth == level).nonzero().squeeze(1)
        groups = []
        for a in sorted({a for _, a in members}):
            cols = torch.tensor([i for i, (_, b) in enumerate(members) if b == a])
            groups.append((ACT_FN[ACTIVATIONS[a]], cols, ids[cols]))
        layers.append((ids, src_t[sel], pos[dst_t[sel]], sel, groups))
    input_index = torch.arange(n_in + 1) if shared_inputs else torch.tensor(ins, dtype=torch.long)
    return Compiled(
        total, input_index, torch.tensor(outs, dtype=torch.long), layers, shared_inputs, len(src)
    )


def forward(
    net: Compiled,
    x: torch.Tensor,
    weights: torch.Tensor | None = None,
    edge_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Outputs of every network for every weight value: ``(W, P, B, n_out)``.

    ``x`` is ``(B, n_in)`` for shared inputs, else ``(W, P, B, n_in)``. ``weights`` (W,)
    are shared values (every connection of every network carries one); ``edge_weights``
    ``(W, E)`` give each connection its own (for weight training). Node values are held
    node-major, ``(nodes, W * B)``, so a layer gathers and scatters whole rows."""
    if (weights is None) == (edge_weights is None):
        raise ValueError("give weights or edge_weights")
    w_count = len(weights) if weights is not None else edge_weights.shape[0]
    batch = x.shape[0] if net.shared_inputs else x.shape[2]
    n = w_count * batch
    values = x.new_zeros(net.n_nodes, n)
    if net.shared_inputs:
        values[0] = 1.0
        values[1 : x.shape[1] + 1] = x.T.repeat(1, w_count)
    else:
        p, n_in = x.shape[1], x.shape[3]
        values[net.input_index[:, 0]] = 1.0
        rows = x.permute(1, 3, 0, 2).reshape(p * n_in, n)
        values[net.input_index[:, 1:].reshape(-1)] = rows
    wcol = None
    if weights is not None:
        wcol = weights.to(x.dtype).repeat_interleave(batch)
    for ids, src, pos, eid, groups in net.layers:
        contrib = values[src]
        if edge_weights is not None:
            ew = edge_weights[:, eid].T.to(x.dtype)  # (E_l, W)
            contrib = (contrib.view(len(src), w_count, batch) * ew.unsqueeze(2)).view(len(src), n)
        pre = x.new_zeros(len(ids), n).index_add(0, pos, contrib)
        if wcol is not None:
            pre = pre * wcol
        for fn, cols, gids in groups:
            values[gids] = fn(pre[cols])
    p, n_out = net.output_index.shape
    out = values[net.output_index.reshape(-1)].view(p, n_out, w_count, batch)
    return out.permute(2, 0, 3, 1)


__all__ = [
    "ACTIVATIONS",
    "MUTATION_RATES",
    "Compiled",
    "Genome",
    "add_connection",
    "add_node",
    "change_activation",
    "compile_population",
    "depths",
    "forward",
    "minimal",
    "mutate",
    "random_topology",
    "topological_order",
]
