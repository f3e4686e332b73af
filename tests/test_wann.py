"""Weight-agnostic topology search: graphs and mutations, evaluation against hand
computation, ranking, novelty, the swing-up and maze simulators, the search itself
(XOR, resume) and the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from ticketlab.evolve import graph as G
from ticketlab.evolve import tasks as T
from ticketlab.evolve.novelty import Archive, novelty
from ticketlab.evolve.ranking import fronts, pareto_rank
from ticketlab.runs import read_csv


def test_mutations_keep_the_graph_acyclic():
    rng = np.random.default_rng(0)
    for _ in range(4):
        g = G.minimal(4, 3, "tanh", 0.3, rng)
        for _ in range(100):
            g = G.mutate(g, rng)
            G.topological_order(g)  # raises on a cycle
            assert len(set(g.edges)) == len(g.edges)
            assert all(not g.is_source(d) and s not in g.outputs for s, d in g.edges)
        # connections added as long as any is possible never close a cycle
        while G.add_connection(g, rng):
            G.topological_order(g)
        assert len(g.hidden) > 5
    with pytest.raises(ValueError):  # the check can fail: a cycle is found
        G.topological_order(G.Genome(1, 1, [0, 0, 0, 0], [(0, 3), (3, 2), (2, 3)]))


def _hand_net():
    # bias 0, inputs 1 2, output 3 (tanh), hidden 4 (sin), 5 (gaussian)
    acts = [0, 0, 0, G.ACTIVATIONS.index("tanh")]
    acts += [G.ACTIVATIONS.index("sin"), G.ACTIVATIONS.index("gaussian")]
    edges = [(1, 4), (2, 4), (4, 5), (0, 5), (5, 3), (1, 3)]
    return G.Genome(2, 1, acts, edges)


def _by_hand(x, w):
    out = []
    for x1, x2 in x.tolist():
        w1, w2, w3, w4, w5, w6 = w
        h4 = math.sin(math.pi * (w1 * x1 + w2 * x2))
        h5 = math.exp(-((w3 * h4 + w4 * 1.0) ** 2) / 2)
        out.append(math.tanh(w5 * h5 + w6 * x1))
    return out


def test_evaluation_equals_hand_computation():
    g = _hand_net()
    assert G.depths(g)[3] == 3 and G.depths(g)[5] == 2
    x = torch.tensor([[0.3, -0.7], [1.2, 0.4], [-0.5, -0.25]], dtype=torch.float64)
    ws = torch.tensor([-2.0, 0.5, 1.5], dtype=torch.float64)
    for shared in (True, False):
        # the hand-built network beside another, in one population
        other = G.minimal(2, 1, "tanh", 1.0, np.random.default_rng(1))
        net = G.compile_population([other, g], shared_inputs=shared)
        xin = x if shared else x.expand(3, 2, 3, 2)
        out = G.forward(net, xin, weights=ws)  # (W, P, B, 1)
        for i, w in enumerate(ws.tolist()):
            assert out[i, 1, :, 0].tolist() == pytest.approx(_by_hand(x, [w] * 6), abs=1e-12)
    # one weight per connection (in the genome's edge order)
    ew = torch.tensor([[0.7, -1.1, 0.4, 2.0, -0.3, 1.6]], dtype=torch.float64)
    out = G.forward(G.compile_population([g]), x, edge_weights=ew)
    assert out[0, 0, :, 0].tolist() == pytest.approx(_by_hand(x, ew[0].tolist()), abs=1e-12)
    # a genome survives its JSON form
    assert G.Genome.from_json(json.loads(json.dumps(g.to_json()))) == g


def test_pareto_fronts_and_rank():
    obj = np.array([[1, 1], [2, 0], [0, 2], [0.5, 0.5], [0, 0]])
    assert fronts(obj).tolist() == [0, 0, 0, 1, 2]
    rank = pareto_rank(obj)
    assert set(rank[:3]) == {0, 1, 2} and rank[3] == 3 and rank[4] == 4
    # the middle of a front is less crowded-out than... boundary points rank first
    line = np.array([[0, 3], [1, 2], [2, 1], [3, 0]])
    r = pareto_rank(line)
    assert {r[0], r[3]} == {0, 1}


def test_novelty_and_archive_forget_similar_behaviours():
    pop = np.array([[[0.0]], [[1.0]], [[3.0]], [[10.0]]])  # (P, W=1, D=1)
    # k=2 nearest others: 0 -> (1, 3) = 2; 1 -> (1, 2) = 1.5; 3 -> (2, 3) = 2.5; 10 -> (7, 9)
    assert novelty(pop, np.zeros((0, 1, 1)), 2).tolist() == [2.0, 1.5, 2.5, 8.0]
    arch = np.array([[[10.5]]])
    assert novelty(pop, arch, 1)[3] == pytest.approx(0.5)
    a = Archive(threshold=1.9, max_size=2)
    added = a.add(pop, novelty(pop, np.zeros((0, 1, 1)), 2))
    assert added == 3  # 0, 3 and 10 enter; then the closest pair's member goes
    assert sorted(a.entries.ravel().tolist()) in ([3.0, 10.0], [0.0, 10.0])
    assert len(a) == 2


def test_swingup_step_against_hand_computation():
    p = T.SWINGUP
    state = torch.tensor([0.0, 0.0, math.pi / 2, 0.0], dtype=torch.float64)
    new = T.swingup_step(state, torch.tensor(1.0, dtype=torch.float64))
    # s = 1, c = 0: x'' = 4 F / (4 M), theta'' = 6 M g / (4 l M)
    x_acc = 4 * p["force"] / (4 * (p["m_c"] + p["m_p"]))
    th_acc = 6 * (p["m_c"] + p["m_p"]) * p["g"] / (4 * p["l"] * (p["m_c"] + p["m_p"]))
    assert new.tolist() == pytest.approx([0, x_acc * p["dt"], math.pi / 2, th_acc * p["dt"]])
    # upright and at rest with no force stays; reward 1 there, 0 hanging down
    up = torch.zeros(4, dtype=torch.float64)
    assert T.swingup_step(up, torch.tensor(0.0, dtype=torch.float64)).tolist() == [0, 0, 0, 0]
    assert float(T.swingup_reward(up)) == 1.0
    assert float(T.swingup_reward(torch.tensor([0, 0, math.pi, 0.0]))) == pytest.approx(0)
    # unforced, a pole tipped from upright falls further the way it leans
    s = torch.tensor([0.0, 0.0, 0.3, 0.0], dtype=torch.float64)
    for _ in range(20):
        s = T.swingup_step(s, torch.tensor(0.0, dtype=torch.float64))
    assert s[2] > 0.3 and s[3] > 0


def test_maze_collisions_and_sensors():
    pts = torch.tensor([[30.0, 22.0], [10.0, 70.0], [9.9, 70.0], [150.0, 131.0]])
    assert T.collides(pts.double()).tolist() == [False, False, True, True]
    loc = torch.tensor([[30.0, 22.0]], dtype=torch.float64)
    ranges = T.rangefinders(loc, torch.zeros(1, dtype=torch.float64))[0]
    # -90: the bottom wall y=5; 0: the wall (114,5)-(73,42) at y=22; 90: nothing within
    # range; 180: the left wall x=5; -45: bottom wall at 17*sqrt(2); 45: wall (58,65)-(241,135)
    front_x = 114 - 41 * (22 - 5) / 37
    slope = 70 / 183
    s = (65 + slope * (30 - 58) - 22) / (1 - slope)
    want = [17.0, 17 * math.sqrt(2), front_x - 30, s * math.sqrt(2), 100.0, 25.0]
    assert ranges.tolist() == pytest.approx(want)
    turned = T.rangefinders(loc, torch.tensor([90.0], dtype=torch.float64))[0]
    assert turned[2] == pytest.approx(100.0) and turned[4] == pytest.approx(25.0)
    # the goal (270, 100) is 18 degrees left of +x: front at heading 0, right at 90, back at 180
    for heading, slot in ((0.0, 0), (90.0, 3), (180.0, 2), (270.0, 1)):
        r = T.radar(loc, torch.tensor([heading], dtype=torch.float64))[0]
        assert r.tolist() == [1.0 if i == slot else 0.0 for i in range(4)]
    # moving into the left wall is refused; a free move goes ahead by the new speed
    z = torch.zeros(1, dtype=torch.float64)
    near = torch.tensor([[10.0, 70.0]], dtype=torch.float64)
    step = T.maze_step(near, torch.tensor([180.0]).double(), z + 2.5, z, torch.tensor([[0.5, 1.0]]))
    assert step[0].tolist() == [[10.0, 70.0]] and float(step[2]) == 3.0
    step = T.maze_step(loc, z.clone(), z.clone(), z.clone(), torch.tensor([[0.5, 1.0]]).double())
    assert step[0].tolist() == [[30.5, 22.0]]


def _spec(tmp_path, **kw):
    from ticketlab.methods.wann import WannSpec

    base = dict(task="xor", population=24, generations=6, runs_dir=str(tmp_path), quiet=True)
    return WannSpec(**{**base, **kw})


def _xor_corners(n, gen):
    """XOR of noisy corners of [-1, 1]^2: the reference's XOR task, two-valued inputs."""
    s = torch.randint(0, 2, (n, 2), generator=gen) * 2 - 1
    return s + 0.1 * torch.randn(n, 2, generator=gen), ((s[:, 0] > 0) ^ (s[:, 1] > 0)).long()


def test_xor_is_solved_with_a_shared_weight(tmp_path):
    from ticketlab.data import from_tensors
    from ticketlab.methods.wann import WannExperiment

    gen = torch.Generator().manual_seed(0)
    data = from_tensors(*_xor_corners(240, gen), *_xor_corners(80, gen), val_size=0, name="xc")
    # Pareto over accuracy and novelty of the probe predictions: objective-only selection
    # stalls at 3 of 4 corners on this budget
    spec = _spec(tmp_path, population=64, generations=40, selection="both", seed=0)
    rows = WannExperiment(spec, data=data).run()
    final = {r["variant"]: r for r in rows if r["variant"] != "search"}
    # one shared value classifies every held-out point
    assert final["wann"]["best_performance"] >= 0.95, final["wann"]
    assert final["random-topology"]["best_performance"] < 0.9


def test_resumed_search_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    import ticketlab.methods.wann as wann
    from ticketlab.errors import RunInterrupted

    full = wann.WannExperiment(_spec(tmp_path / "a", selection="both"))
    full.run()
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] >= 3

    monkeypatch.setattr(wann, "stop_requested", stop_after_three)
    part = wann.WannExperiment(_spec(tmp_path / "b", selection="both"))
    with pytest.raises(RunInterrupted):
        part.run()
    assert len(read_csv(part.dir / "results.csv")) == 3
    monkeypatch.setattr(wann, "stop_requested", lambda: False)
    wann.WannExperiment(_spec(tmp_path / "b", selection="both")).run()

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    a, b = full.dir, part.dir
    assert strip(read_csv(a / "results.csv")) == strip(read_csv(b / "results.csv"))
    for name in ("replicate-0/final.json", "replicate-0/state.json"):
        ja, jb = json.loads((a / name).read_text()), json.loads((b / name).read_text())
        ja.pop("rows"), jb.pop("rows")
        assert ja == jb
    archive = json.loads((a / "replicate-0/state.json").read_text())["archive"]["file"]
    ta = load_file(a / "replicate-0" / archive)["entries"]
    assert torch.equal(ta, load_file(b / "replicate-0" / archive)["entries"]) and len(ta) > 0
    # more generations extend the same run
    more = wann.WannExperiment(_spec(tmp_path / "a", selection="both", generations=8))
    assert more.dir == a
    rows = more.run()
    assert max(int(r["generation"]) for r in rows if r["variant"] == "search") == 7


def test_maze_run_and_report(tmp_path):
    from ticketlab.methods.wann import WannExperiment
    from ticketlab.report import build_report

    spec = _spec(tmp_path, task="maze", population=8, generations=2, episode_steps=30)
    spec = spec.replace(selection="novelty")
    exp = WannExperiment(spec)
    rows = exp.run()
    search = [r for r in rows if r["variant"] == "search"]
    assert len(search) == 2 and all(r["solved"] is False for r in search)
    gen = json.loads((exp.dir / "replicate-0/generations/gen-0001.json").read_text())
    ends = np.asarray(gen["endpoints"])  # (P, W, 2), inside the maze
    assert ends.shape == (8, 6, 2) and (ends[..., 0] > 5).all() and (ends[..., 1] < 135).all()
    page = build_report([exp.dir], tmp_path / "report")
    made = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"wann-weights.png", "wann-generations.png"} <= made
    assert any(n.startswith("maze-") for n in made) and any(n.startswith("network-") for n in made)
    assert "Weight-agnostic search" in page.read_text()


def test_bad_task_exits_2_listing_choices(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "wann", "--task", "cartpole", "--runs-dir", tmp_path)
    assert rc == 2
    assert "swingup" in err and "maze" in err and "fashion_mnist" in err
    assert not any(tmp_path.iterdir())
    rc, _, err = run_cli(
        capsys, "wann", "--task", "maze", "--train-weights", "--runs-dir", tmp_path
    )
    assert rc == 2 and "differentiable" in err
