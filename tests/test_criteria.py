"""Pruning criteria against hand computations, and the one-shot ``prune`` command.

Models are tiny (a 3-4-2 MLP), so each check is an exact autograd computation.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_cli
from ticketlab.data import from_tensors
from ticketlab.errors import UsageError
from ticketlab.masks import Mask
from ticketlab.pruning import CRITERIA, Context, magnitude_scores, random_scores, select
from ticketlab.spec import Spec

NAMES = ["0.weight", "2.weight"]


def tiny(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.ReLU(), nn.Linear(4, 2, bias=bias))


def tiny_data(n=12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    y = torch.arange(n) % 2
    return from_tensors(x, y, x[:4], y[:4], num_classes=2)


def full_batch(data, **kw):
    """A context whose one minibatch is the whole training set."""
    return Context(data=data, batches=1, batch_size=len(data.y_train), **kw)


def weights(model):
    return [model[0].weight, model[2].weight]


def loss_of_weights(model, data):
    """The mean loss on all training data as a function of the two weight matrices."""

    def f(w1, w2):
        h = F.relu(F.linear(data.x_train, w1, model[0].bias))
        return F.cross_entropy(F.linear(h, w2, model[2].bias), data.y_train)

    return f


def hessian_blocks(model, data):
    """The full Hessian over (w1, w2), flattened to one matrix."""
    w = [p.detach() for p in weights(model)]
    h = torch.autograd.functional.hessian(loss_of_weights(model, data), tuple(w))
    sizes = [p.numel() for p in w]
    rows = [torch.cat([h[i][j].reshape(sizes[i], sizes[j]) for j in range(2)], 1) for i in range(2)]
    return torch.cat(rows, 0)


def test_registry_docstrings_and_old_interface():
    for name, fn in CRITERIA.items():
        doc = (fn.__doc__ or "").strip()
        assert doc and doc.splitlines()[0], name
    model, gen = tiny(), torch.Generator().manual_seed(0)
    mask = Mask.dense(model)
    mag = magnitude_scores(model, mask, gen)  # the third argument used to be a generator
    assert torch.equal(mag["0.weight"], model[0].weight.detach().abs())
    r1 = random_scores(model, mask, torch.Generator().manual_seed(3))
    r2 = random_scores(model, mask, Context(generator=torch.Generator().manual_seed(3)))
    assert all(torch.equal(r1[k], r2[k]) for k in NAMES)


def test_snip_equals_normalised_mask_gradient():
    model, data = tiny(), tiny_data()
    scores = CRITERIA["snip"](model, Mask.dense(model), full_batch(data))
    # dL/dc at c = 1 for the multiplicative mask c, by autograd directly
    cs = [torch.ones_like(w, requires_grad=True) for w in weights(model)]
    f = loss_of_weights(model, data)
    gc = torch.autograd.grad(f(*(c * w.detach() for c, w in zip(cs, weights(model)))), cs)
    total = sum(g.abs().sum() for g in gc)
    for name, g in zip(NAMES, gc):
        torch.testing.assert_close(scores[name], g.abs() / total)
    assert abs(sum(float(s.sum()) for s in scores.values()) - 1.0) < 1e-5


def test_grasp_is_w_times_hessian_gradient():
    model, data = tiny(), tiny_data()
    ctx = full_batch(data, options={"temperature": 1.0, "samples_per_class": 100})
    scores = CRITERIA["grasp"](model, Mask.dense(model), ctx)
    w = torch.cat([p.detach().flatten() for p in weights(model)])
    f = loss_of_weights(model, data)
    g = torch.cat([t.flatten() for t in torch.autograd.grad(f(*weights(model)), weights(model))])
    expected = w * (hessian_blocks(model, data) @ g)
    got = torch.cat([scores[n].flatten() for n in NAMES])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    # signed, and the highest w * Hg is kept (the paper removes the top of -w * Hg)
    assert (got < 0).any() and (got > 0).any()
    kept = select(scores, Mask.dense(model), 0.25, "global")
    flat_kept = torch.cat([kept[n].flatten() for n in NAMES])
    assert got[flat_kept].min() >= got[~flat_kept].max()


def test_synflow_closed_form_and_model_untouched():
    model = tiny(bias=False)
    before = [p.detach().clone() for p in model.parameters()]
    scores = CRITERIA["synflow"](model, Mask.dense(model), Context(input_shape=(3,)))
    a1, a2 = model[0].weight.detach().abs(), model[2].weight.detach().abs()
    # R = 1^T |W2| |W1| 1: dR/dW1_ij = sum_k |W2|_ki, dR/dW2_ki = sum_j |W1|_ij
    torch.testing.assert_close(scores["0.weight"], a1 * a2.sum(0)[:, None])
    torch.testing.assert_close(scores["2.weight"], a2 * a1.sum(1)[None, :])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # iterated: the final selection keeps exactly the target count
    ctx = Context(input_shape=(3,), density=0.25, options={"rounds": 5, "double": True})
    it = CRITERIA["synflow"](model, Mask.dense(model), ctx)
    assert select(it, Mask.dense(model), 0.25, "global").num_kept() == 5


def test_taylor_and_fisher():
    model, data = tiny(), tiny_data()
    w = weights(model)
    f = loss_of_weights(model, data)
    g = torch.autograd.grad(f(*w), w)
    taylor = CRITERIA["taylor"](model, Mask.dense(model), full_batch(data))
    for name, gi, wi in zip(NAMES, g, w):
        torch.testing.assert_close(taylor[name], (gi * wi.detach()) ** 2)
    fisher = CRITERIA["fisher"](model, Mask.dense(model), full_batch(data))
    sq = [torch.zeros_like(p) for p in w]
    for i in range(len(data.y_train)):
        one = from_tensors(
            data.x_train[i : i + 1],
            data.y_train[i : i + 1],
            data.x_test,
            data.y_test,
            num_classes=2,
        )
        gi = torch.autograd.grad(loss_of_weights(model, one)(*w), w)
        for s, t in zip(sq, gi):
            s += t**2
    for name, s, wi in zip(NAMES, sq, w):
        expected = 0.5 * wi.detach() ** 2 * s / len(data.y_train)
        torch.testing.assert_close(fisher[name], expected, rtol=1e-4, atol=1e-9)


def test_obd_exact_and_hutchinson():
    model, data = tiny(), tiny_data()
    w = torch.cat([p.detach().flatten() for p in weights(model)])
    diag = torch.diagonal(hessian_blocks(model, data))
    expected = 0.5 * w**2 * diag
    exact = CRITERIA["obd"](
        model, Mask.dense(model), full_batch(data, options={"hessian": "exact"})
    )
    got = torch.cat([exact[n].flatten() for n in NAMES])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    # hutchinson: the mean of v * Hv over Rademacher probes v, drawn layer by layer per probe
    probes, seed = 20, 7
    ctx = full_batch(
        data,
        generator=torch.Generator().manual_seed(seed),
        options={"hessian": "hutchinson", "probes": probes},
    )
    hut = CRITERIA["obd"](model, Mask.dense(model), ctx)
    est = torch.cat([hut[n].flatten() for n in NAMES])
    gen, h, acc = torch.Generator().manual_seed(seed), hessian_blocks(model, data), 0
    torch.randperm(len(data.y_train), generator=gen)  # the minibatch draw comes first
    for _ in range(probes):
        v = torch.cat(
            [
                torch.randint(0, 2, p.shape, generator=gen).flatten() * 2.0 - 1
                for p in weights(model)
            ]
        )
        acc = acc + v * (h @ v) / probes
    torch.testing.assert_close(est, 0.5 * w**2 * acc, rtol=1e-4, atol=1e-7)


def test_obd_gauss_newton_is_jt_h_j():
    # tanh, so the first layer's Hessian has a second-derivative term the GN drops
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x = tiny_data().x_train
    y = torch.arange(len(x)) % 3
    data = from_tensors(x, y, x[:4], y[:4], num_classes=3)
    w = [model[0].weight.detach(), model[2].weight.detach()]

    def logits(x, w1, w2):
        return F.linear(torch.tanh(F.linear(x, w1, model[0].bias)), w2, model[2].bias)

    # independent: per-example Jacobians of the logits, G = mean_n J^T (diag p - p p^T) J
    gn = [torch.zeros(p.numel()) for p in w]
    for xi in data.x_train:
        jac = torch.autograd.functional.jacobian(lambda w1, w2, xi=xi: logits(xi, w1, w2), tuple(w))
        p = torch.softmax(logits(xi, *w), -1).detach()
        h = torch.diag(p) - torch.outer(p, p)
        for g, j in zip(gn, jac):
            j = j.reshape(len(p), -1)
            g += torch.diagonal(j.T @ h @ j) / len(data.y_train)
    ctx = full_batch(data, options={"hessian": "gauss-newton"})
    scores = CRITERIA["obd"](model, Mask.dense(model), ctx)
    for name, g, wi in zip(NAMES, gn, w):
        torch.testing.assert_close(scores[name], 0.5 * wi**2 * g.view_as(wi), rtol=1e-4, atol=1e-8)

    def loss(w1, w2):
        return F.cross_entropy(logits(data.x_train, w1, w2), data.y_train)

    # the logits are linear in the last layer's weights: there GN = the exact Hessian diagonal
    hess = torch.autograd.functional.hessian(loss, tuple(w))
    obd = [0.5 * wi**2 * torch.diagonal(hess[i][i].reshape(wi.numel(), -1)).view_as(wi)
           for i, wi in enumerate(w)]  # fmt: skip
    torch.testing.assert_close(scores[NAMES[1]], obd[1], rtol=1e-4, atol=1e-8)
    # but not in the first layer (tanh'' != 0): GN is not the exact Hessian there
    assert not torch.allclose(scores[NAMES[0]], obd[0], rtol=1e-3, atol=1e-8)
    with pytest.raises(UsageError, match="gauss-newton"):
        CRITERIA["obd"](model, Mask.dense(model), full_batch(data, options={"hessian": "gn"}))


def test_synflow_conserves_flow_through_each_hidden_layer():
    torch.manual_seed(0)
    sizes = [5, 8, 6, 7, 3]
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    names = Mask.dense(model).names()
    # no target density: one round of scoring
    ctx = Context(input_shape=(5,), options={"double": True})
    scores = CRITERIA["synflow"](model, Mask.dense(model), ctx)
    s = [scores[n] for n in names]
    assert all(t.dtype == torch.float64 for t in s)
    for incoming, outgoing in zip(s, s[1:]):
        # per hidden neuron j: sum of scores into j == sum of scores out of j
        torch.testing.assert_close(incoming.sum(1), outgoing.sum(0), rtol=1e-5, atol=0)
    totals = torch.stack([t.sum() for t in s])
    torch.testing.assert_close(totals, totals[:1].expand_as(totals), rtol=1e-5, atol=0)


def test_trained_versus_init_criteria_by_hand():
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    wi = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    wf = torch.tensor([[2.0, 1.0], [-0.25, 4.0]])
    with torch.no_grad():
        model[0].weight.copy_(wf)
    mask, ctx = Mask.dense(model), Context(init_state={"0.weight": wi})

    def score(name):
        return CRITERIA[name](model, mask, ctx)["0.weight"]

    assert torch.equal(score("large_final"), wf.abs())
    assert torch.equal(score("magnitude_increase"), torch.tensor([[1.0, -1.0], [-0.25, 1.0]]))
    assert torch.equal(score("zhou_movement"), torch.tensor([[1.0, 3.0], [0.75, 1.0]]))
    # ascending ranks: |wi| [1, 2, .5, 3] -> [1, 2, 0, 3]; |wf| [2, 1, .25, 4] -> [2, 1, 0, 3]
    assert torch.equal(score("large_init_large_final"), torch.tensor([[1.0, 1.0], [0.0, 3.0]]))
    assert torch.equal(score("large_final_same_sign"), torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    with pytest.raises(UsageError, match="initial weights"):
        CRITERIA["large_final"](model, mask, Context())


def test_data_criteria_need_data_and_lottery_passes_it():
    model = tiny()
    with pytest.raises(UsageError, match="needs data"):
        CRITERIA["snip"](model, Mask.dense(model), Context())
    # the lottery builds a context with the data, the input shape and the initial weights
    for name in ("snip", "synflow", "large_final", "random"):
        assert Spec(criterion=name).criterion == name
    with pytest.raises(UsageError, match="criterion"):
        Spec(criterion="movement")  # accumulated during training: gradual only
    with pytest.raises(UsageError, match="criterion"):
        Spec(method="dst", criterion="snip")  # other methods: data-free only


def test_lottery_snip_end_to_end(tmp_path, capsys):
    masks = {}
    for name in ("magnitude", "snip"):
        rc, _, err = run_cli(
            capsys, "lottery", *XOR, "--runs-dir", tmp_path / name, "--levels", "2",
            "--criterion", name,
        )  # fmt: skip
        assert rc == 0, err
        (run,) = (tmp_path / name).iterdir()
        rep = run / "replicate-0"
        masks[name] = [Mask.load(rep / f"level-{k}" / "mask.safetensors") for k in (1, 2)]
        assert len(list(csv.DictReader(open(run / "results.csv")))) == 3
    for mag, snip in zip(masks["magnitude"], masks["snip"]):
        assert snip.density() == pytest.approx(mag.density())
        assert snip != mag


# the prune command ----------------------------------------------------------------------------

XOR = ["--dataset", "xor", "--model", "mlp_16", "--batch-size", "50"]
XOR += ["--steps", "40it", "--eval-every", "20it", "--quiet"]


def test_prune_snip_end_to_end(tmp_path, capsys):
    rc, _, err = run_cli(
        capsys, "prune", *XOR, "--runs-dir", tmp_path, "--criterion", "snip", "--density", "0.2"
    )
    assert rc == 0, err
    (run,) = list(tmp_path.iterdir())
    assert run.name.startswith("prune-")
    mask = Mask.load(run / "replicate-0" / "level-1" / "snip" / "mask.safetensors")
    assert mask.num_kept() == round(0.2 * mask.num_total())
    rows = (run / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,replicate,level,variant,density")
    assert len(rows) == 2 and rows[1].startswith("prune,0,1,snip,")
    # --sparsity 0.8 is the same run
    rc, _, err = run_cli(
        capsys, "prune", *XOR, "--runs-dir", tmp_path, "--criterion", "snip", "--sparsity", "0.8"
    )
    assert rc == 0, err
    assert len(list(tmp_path.iterdir())) == 1


def test_prune_trained_large_final(tmp_path, capsys):
    args = ["prune", *XOR, "--runs-dir", tmp_path, "--criterion", "large_final"]
    rc, _, err = run_cli(capsys, *args, "--when", "trained", "--density", "0.5", "--scope", "erk")
    assert rc == 0, err
    (run,) = list(tmp_path.iterdir())
    spec = json.loads((run / "spec.json").read_text())["spec"]
    assert spec["allocation"] == "erk" and spec["when"] == "trained"
    lines = (run / "results.csv").read_text().splitlines()[1:]
    assert [ln.split(",")[2:4] for ln in lines] == [["0", "dense"], ["1", "large_final"]]


BAD = {
    "both targets": ["--criterion", "snip", "--density", "0.2", "--sparsity", "0.8"],
    "no target": ["--criterion", "snip"],
    "density above 1": ["--criterion", "snip", "--density", "1.5"],
    "sparsity 0": ["--criterion", "snip", "--sparsity", "0"],
    "trained criterion at init": ["--criterion", "large_final", "--density", "0.5"],
    "unknown criterion": ["--criterion", "nope", "--density", "0.5"],
    "training-time criterion": ["--criterion", "movement", "--density", "0.5"],
    "unknown allocation": ["--criterion", "snip", "--density", "0.5", "--allocation", "x"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_prune_bad_input_exits_2(case, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "prune", *XOR, "--runs-dir", tmp_path / "r", *BAD[case])
    assert rc == 2, err
    assert err.startswith("ticketlab: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    if case == "training-time criterion":
        assert "accumulated while training" in err and "gradual" in err


def test_list_criteria(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    rc, out, _ = run_cli(capsys, "list", "criteria")
    assert rc == 0
    for name in CRITERIA:
        assert name in out
    assert "Lee et al. 2019" in out


@pytest.mark.parametrize(
    "name", ["snip", "grasp", "taylor", "fisher", "obd", "gates", "variance", "hebbian"]
)
def test_scoring_leaves_a_batchnorm_model_as_it_was(name):
    """Scoring in train mode runs BatchNorm forward; its running statistics must not move."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    model.eval()
    data = tiny_data(16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = Mask.dense(model)
    scores = CRITERIA[name](model, mask, full_batch(data, options={"gates_steps": 3}))
    assert set(scores) == set(mask.names())
    assert not model.training
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _wide(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))


def test_synflow_invert_keeps_the_lowest_inside_every_round():
    """The invert control inverts each SynFlow round (Tanaka et al.'s code), not the result:
    negating the result turns the -inf of earlier rounds into +inf and keeps exactly the
    weights SynFlow removed."""
    from ticketlab.pruning import score
    from ticketlab.pruning.criteria import _global_top

    model, rounds, target = _wide(), 4, 0.2
    dense = Mask.dense(model)
    total = dense.num_total()
    ctx = Context(input_shape=(8,), density=target, options={"rounds": rounds, "double": True})
    got = select(score("synflow", model, dense, ctx, invert=True), dense, target, "global")
    # by hand: every round scores the masked net and keeps its lowest scores
    current = {n: m.clone() for n, m in dense.items()}
    one = Context(input_shape=(8,), options={"rounds": 1, "double": True})
    for k in range(1, rounds + 1):
        s = CRITERIA["synflow"](model, Mask(current), one)
        keep = int(round(target ** (k / rounds) * total))
        current = _global_top({n: -v for n, v in s.items()}, current, keep)
    assert got.num_kept() == int(round(target * total))
    for n in dense.names():
        assert torch.equal(got[n], current[n]), n
    plain = select(score("synflow", model, dense, ctx), dense, target, "global")
    assert plain.jaccard(got) < 0.5


def test_no_allocation_picks_minus_inf_while_a_finite_score_is_left():
    from ticketlab.pruning.allocation import ALLOCATIONS

    model = _wide()
    dense = Mask.dense(model)
    gen = torch.Generator().manual_seed(1)
    scores = {}
    for n, m in dense.items():
        s = -torch.rand(m.shape, generator=gen)  # finite scores all below zero
        s[torch.rand(m.shape, generator=gen) < 0.6] = -float("inf")
        scores[n] = s
    for allocation in ALLOCATIONS:
        got = select(scores, dense, 0.3, allocation, model=model)
        if allocation == "global":
            pools = [(torch.cat([got[n].flatten() for n in NAMES_W]), NAMES_W)]
        else:
            pools = [(got[n].flatten(), [n]) for n in NAMES_W]
        for chosen, names in pools:
            s = torch.cat([scores[n].flatten() for n in names])
            finite = torch.isfinite(s)
            if bool((chosen & ~finite).any()):  # a -inf was picked: every finite one was
                assert bool(chosen[finite].all()), allocation
    nan = {n: s.clone() for n, s in scores.items()}
    nan["0.weight"][0, 0] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        select(nan, dense, 0.3, "global", model=model)


NAMES_W = ["0.weight", "2.weight"]


def test_large_init_large_final_ranks_only_kept_weights():
    """Zhou et al.'s reference sends removed weights to the bottom of both rankings."""
    torch.manual_seed(3)
    init = torch.randn(20, 10)
    final = init + 0.5 * torch.randn(20, 10)
    kept = torch.rand(20, 10) < 0.4
    final = final * kept  # removed weights are zero after training at a later level
    model = nn.Sequential(nn.Linear(10, 20, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(final)
    mask = Mask({"0.weight": kept})
    ctx = Context(init_state={"0.weight": init})
    got = CRITERIA["large_init_large_final"](model, mask, ctx)["0.weight"]
    # by hand: ranks among the kept entries only
    idx = kept.flatten().nonzero().flatten()
    ri = torch.argsort(torch.argsort(init.abs().flatten()[idx], stable=True))
    rf = torch.argsort(torch.argsort(final.abs().flatten()[idx], stable=True))
    want = torch.minimum(ri, rf)
    have = got.flatten()[idx]
    k = len(idx) // 2
    top_have = set(idx[torch.argsort(-have, stable=True)[:k]].tolist())
    top_want = set(idx[torch.argsort(-want.double(), stable=True)[:k]].tolist())
    assert top_have == top_want
    assert got.flatten()[~kept.flatten()].max() < have.min()
