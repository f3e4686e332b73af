"""Pruning criteria behind one interface: ``(model, mask, context) -> {name: scores}``.

Higher score = kept. Scores cover every weight of each masked layer (entries the
mask already removed are scored too; allocation gives them -inf). ``CRITERIA``
maps a name to its function; each function's docstring cites its paper, and its
first line is what ``ticketlab list criteria`` shows. The attributes ``needs_data``
and ``needs_trained`` say what the context must carry.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import structure
from ..errors import UsageError
from ..masks import Mask

Scores = dict[str, torch.Tensor]


@dataclass
class Context:
    """What a criterion may need beyond the model and the mask.

    ``data`` gives ``batches`` minibatches of ``batch_size`` training examples,
    drawn with ``generator``; ``init_state`` holds the initial weights (by
    parameter name) for the trained-vs-init criteria; ``density`` is the target
    that iterative criteria (SynFlow) prune towards; ``options`` holds
    per-criterion knobs (see each criterion).
    """

    data: object | None = None  # a ticketlab.data.Dataset
    batches: int = 1
    batch_size: int = 128
    generator: torch.Generator | None = None
    init_state: dict[str, torch.Tensor] | None = None
    loss_fn: Callable = F.cross_entropy
    density: float | None = None
    input_shape: tuple[int, ...] | None = None
    options: dict = field(default_factory=dict)

    def option(self, name: str, default):
        return self.options.get(name, default)


def as_context(context) -> Context:
    """Accept a :class:`Context`, a bare ``torch.Generator`` (the old interface) or None."""
    if context is None:
        return Context()
    if isinstance(context, torch.Generator):
        return Context(generator=context)
    return context


CRITERIA: dict[str, Callable[..., Scores]] = {}


def criterion(
    name: str, needs_data: bool = False, needs_trained: bool = False, needs_input: bool = False
):
    """Register a criterion function under ``name``.

    ``needs_input``: the criterion needs the input shape (or the data) although no examples.
    """

    def wrap(fn):
        fn.needs_data = needs_data
        fn.needs_trained = needs_trained
        fn.needs_input = needs_input
        CRITERIA[name] = fn
        return fn

    return wrap


def criterion_names(method: str | None = None) -> tuple[str, ...]:
    """Names a method accepts: all (None); for ``prune`` and ``lottery`` (whose per-level
    pruning passes the data, the input shape and the initial weights) all but those
    accumulated during training (``needs_training``: movement); for ``gradual`` the
    data-free ones and those; otherwise those needing no data, input shape or initial
    weights."""
    if method is None:
        return tuple(CRITERIA)
    if method in ("prune", "lottery"):
        return tuple(k for k, f in CRITERIA.items() if not getattr(f, "needs_training", False))
    free = tuple(
        k for k, f in CRITERIA.items() if not (f.needs_data or f.needs_trained or f.needs_input)
    )
    if method == "gradual":  # scored during training: free ones, and those accumulated then
        return free + tuple(k for k, f in CRITERIA.items() if getattr(f, "needs_training", False))
    return free


def needs_trained(name: str) -> bool:
    return bool(getattr(CRITERIA.get(name), "needs_trained", False))


# helpers ---------------------------------------------------------------------------------------


def _weights(model: nn.Module, mask: Mask) -> dict[str, nn.Parameter]:
    """The parameters ``mask`` names: any parameter a selection made prunable."""
    weights = dict(model.named_parameters())
    missing = [k for k in mask.names() if k not in weights]
    if missing:
        raise UsageError(f"mask names weights the model lacks: {', '.join(missing)}")
    return {k: weights[k] for k in mask.names()}


def _need_data(ctx: Context, name: str):
    if ctx.data is None:
        raise UsageError(f"criterion '{name}' needs data (a context with a dataset)")
    return ctx.data


def _batches(ctx: Context, name: str):
    """``ctx.batches`` minibatches of training data, drawn without replacement."""
    data = _need_data(ctx, name)
    n = data.n_train
    bs = min(ctx.batch_size, n)
    total = min(ctx.batches * bs, n)
    perm = torch.randperm(n, generator=ctx.generator)[:total]
    return [data.train_examples(idx) for idx in perm.split(bs)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _grads(model, weights, x, y, loss_fn, create_graph=False):
    dev = _device(model)
    loss = loss_fn(structure.call(model, structure.to_device(x, dev)), structure.to_device(y, dev))
    gs = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph)
    return dict(zip(weights, gs))


class _mode:
    """Put a model in train/eval mode for a block, and restore its mode after.

    In train mode the forward passes of scoring update BatchNorm's running
    statistics; they are restored too, so scoring leaves the model as it was.
    """

    def __init__(self, model: nn.Module, training: bool):
        self.model, self.training = model, training

    def __enter__(self):
        self.was = self.model.training
        self.buffers = (
            {k: b.detach().clone() for k, b in self.model.named_buffers()} if self.training else {}
        )
        self.model.train(self.training)

    def __exit__(self, *exc):
        self.model.train(self.was)
        with torch.no_grad():
            for k, b in self.model.named_buffers():
                if k in self.buffers:
                    b.copy_(self.buffers[k])


def _init_weights(ctx: Context, names, name: str) -> dict[str, torch.Tensor]:
    if ctx.init_state is None:
        raise UsageError(f"criterion '{name}' compares trained with initial weights; none given")
    missing = [k for k in names if k not in ctx.init_state]
    if missing:
        raise UsageError(f"initial weights lack: {', '.join(missing)}")
    return {k: ctx.init_state[k].detach().cpu() for k in names}


# data-free ---------------------------------------------------------------------------------------


@criterion("magnitude")
def magnitude_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """|w| (Han et al. 2015; Frankle & Carbin 2019).

    score = |w|.
    """
    weights = _weights(model, mask)
    return {k: w.detach().abs().cpu() for k, w in weights.items()}


@criterion("random")
def random_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """Uniform random scores: the random-pruning baseline.

    score ~ U[0, 1), drawn from ``context.generator``.
    """
    gen = as_context(context).generator
    return {k: torch.rand(m.shape, generator=gen) for k, m in mask.items()}


@criterion("synflow", needs_input=True)
def synflow_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """SynFlow (Tanaka et al. 2020): data-free iterative synaptic flow |w * dR/dw|.

    R = sum of the outputs of the network with every parameter and buffer
    replaced by its absolute value, in eval mode, on an all-ones input of one
    sample's shape; score = |w * dR/dw|. With ``context.density`` set, the mask
    is pruned globally over ``rounds`` (option, default 100) with the exponential
    schedule (density d^(k/rounds) after round k), the mask applied before each
    round's scoring; the scores returned are the last round's, so a global top-d
    selection gives the final mask. Option ``double`` computes in float64 (deep
    nets overflow float32). Option ``invert`` (the ``invert`` control) keeps the
    lowest scores inside every round, as the reference inverts before each round's
    masking; the scores returned are then negated, removed weights still -inf.
    The model itself is not touched (a copy is scored).
    """
    ctx = as_context(context)
    if ctx.data is not None and not structure.is_plain_float(ctx.data.x_train):
        raise UsageError(
            "criterion 'synflow' cannot score this model: it feeds an all-ones floating "
            f"input, and the model takes {structure.describe(ctx.data.x_train)}"
        )
    shape = ctx.input_shape or (ctx.data.input_shape if ctx.data is not None else None)
    if shape is None:
        raise UsageError("criterion 'synflow' needs the input shape (context.input_shape)")
    rounds = int(ctx.option("rounds", 100))
    sign = -1.0 if ctx.option("invert", False) else 1.0
    if rounds < 1:
        raise UsageError(f"synflow rounds must be >= 1; got {rounds}")
    net = copy.deepcopy(model)
    net.eval()
    if ctx.option("double", False):
        net.double()
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
    weights = _weights(net, mask)
    original = {k: w.detach().clone() for k, w in weights.items()}
    current = {k: m.cpu().clone() for k, m in mask.items()}  # ranked beside the CPU scores
    total = mask.num_total()
    start = mask.density()
    target = ctx.density
    if target is None or target >= start:
        rounds = 1
    dtype = next(net.parameters()).dtype
    dev = _device(net)
    x = torch.ones((1, *shape), dtype=dtype, device=dev)
    scores: Scores = {}
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(original[n] * current[n].to(dev, w.dtype))
        out = net(x)
        grads = torch.autograd.grad(out.sum(), list(weights.values()))
        scores = {
            n: sign * (w.detach() * g).abs().cpu() for (n, w), g in zip(weights.items(), grads)
        }
        if k < rounds:
            keep = int(round(target ** (k / rounds) * total))
            current = _global_top(scores, current, keep)
    if rounds > 1:  # what earlier rounds removed stays removed
        scores = {n: s.masked_fill(~current[n], -math.inf) for n, s in scores.items()}
    return scores


synflow_scores.iterative = True  # prunes inside: inverting it means inverting every round


def invert_scores(scores: Scores) -> Scores:
    """Negated scores (lowest kept first); -inf (already removed) stays -inf."""
    return {n: torch.where(torch.isneginf(s), s, -s) for n, s in scores.items()}


def score(name: str, model: nn.Module, mask: Mask, context=None, invert: bool = False) -> Scores:
    """Scores of criterion ``name``; ``invert`` scores for keeping the lowest (the ``invert``
    control): an iterative criterion (SynFlow) inverts inside each of its rounds, any other
    has its scores negated, removed weights left at -inf either way."""
    if name not in CRITERIA:
        raise UsageError(f"unknown criterion '{name}'; choose from: {', '.join(CRITERIA)}")
    fn = CRITERIA[name]
    if not invert:
        return fn(model, mask, context)
    if getattr(fn, "iterative", False):
        ctx = as_context(context)
        ctx = dataclasses.replace(ctx, options={**ctx.options, "invert": True})
        return fn(model, mask, ctx)
    return invert_scores(fn(model, mask, context))


def _global_top(scores: Scores, mask: dict, keep: int) -> dict:
    """Keep the ``keep`` highest scores among the entries ``mask`` keeps (ties: lower index)."""
    names = list(mask)
    flat = torch.cat([scores[n].flatten().double() for n in names])
    kept = torch.cat([mask[n].flatten() for n in names])
    flat = torch.where(kept, flat, torch.full_like(flat, -math.inf))
    order = torch.argsort(-flat, stable=True)
    new = torch.zeros_like(kept)
    new[order[:keep]] = True
    new &= kept
    out, offset = {}, 0
    for n in names:
        size = mask[n].numel()
        out[n] = new[offset : offset + size].view_as(mask[n])
        offset += size
    return out


# gradient-based ----------------------------------------------------------------------------------


@criterion("snip", needs_data=True)
def snip_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """SNIP (Lee et al. 2019): connection sensitivity |g * w| / sum of |g * w|.

    g * w = dL(c * w)/dc at c = 1, with g the gradient of the loss on
    ``context.batches`` minibatches (summed); normalised over all masked
    weights, so the scores are ranked globally.
    """
    ctx = as_context(context)
    weights = _weights(model, mask)
    acc = {k: torch.zeros_like(w) for k, w in weights.items()}
    with _mode(model, True):
        for x, y in _batches(ctx, "snip"):
            for k, g in _grads(model, weights, x, y, ctx.loss_fn).items():
                acc[k] += g
    sal = {k: (acc[k] * w.detach()).abs().cpu() for k, w in weights.items()}
    norm = sum(float(s.double().sum()) for s in sal.values())
    return {k: s / norm if norm > 0 else s for k, s in sal.items()}


def _class_batches(ctx: Context, per_class: int):
    """``per_class`` training examples of each class, in batches of ``ctx.batch_size``."""
    data = _need_data(ctx, "grasp")
    if not torch.is_tensor(data.y_train) or not data.num_classes:
        raise UsageError(
            "criterion 'grasp' draws examples of each class: it needs class labels in memory"
        )
    y = data.y_train
    picks = []
    for c in range(data.num_classes):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=ctx.generator)[:per_class]]
        picks.append(idx)
    idx = torch.cat(picks)
    idx = idx[torch.randperm(len(idx), generator=ctx.generator)]
    return [(data.x_train[i], data.y_train[i]) for i in idx.split(max(ctx.batch_size, 1))]


@criterion("grasp", needs_data=True)
def grasp_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """GraSP (Wang et al. 2020): gradient signal preservation, score = w * (H g), signed.

    g is the loss gradient with the logits divided by a temperature (option
    ``temperature``, 200) on ``samples_per_class`` (option, 10) examples of each
    class; Hg is a Hessian-vector product by double backward. The paper removes
    the largest -w * Hg, so the largest w * Hg is kept.
    """
    ctx = as_context(context)
    temp = float(ctx.option("temperature", 200.0))
    batches = _class_batches(ctx, int(ctx.option("samples_per_class", 10)))
    weights = _weights(model, mask)
    params = list(weights.values())
    dev = _device(model)

    def loss_of(x, y):
        out = structure.call(model, structure.to_device(x, dev))
        return ctx.loss_fn(out / temp, structure.to_device(y, dev))

    with _mode(model, True):
        g = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            for a, b in zip(g, torch.autograd.grad(loss_of(x, y), params)):
                a += b
        hg = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            grads = torch.autograd.grad(loss_of(x, y), params, create_graph=True)
            z = sum((gi * a.detach()).sum() for gi, a in zip(grads, g))
            for a, b in zip(hg, torch.autograd.grad(z, params)):
                a += b
    return {k: (w.detach() * h).cpu() for (k, w), h in zip(weights.items(), hg)}


@criterion("taylor", needs_data=True)
def taylor_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """First-order Taylor (Molchanov et al. 2019): (g * w)^2 summed over minibatches.

    g is each minibatch's loss gradient; ``context.batches`` minibatches.
    """
    ctx = as_context(context)
    weights = _weights(model, mask)
    acc = {k: torch.zeros_like(w) for k, w in weights.items()}
    with _mode(model, True):
        for x, y in _batches(ctx, "taylor"):
            for k, g in _grads(model, weights, x, y, ctx.loss_fn).items():
                acc[k] += (g * weights[k].detach()) ** 2
    return {k: v.cpu() for k, v in acc.items()}


def per_example_grads(model: nn.Module, weights: dict, x, y, loss_fn) -> dict:
    """Per-example gradients (N, *shape) of ``loss_fn`` by torch.func vmap + grad (eval mode)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    names = list(weights)

    def loss(wsel, xi, yi):
        p = dict(params)
        p.update(wsel)
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    dev = _device(model)
    with _mode(model, False):
        return vmap(grad(loss), in_dims=(None, 0, 0))(
            {k: params[k] for k in names}, x.to(dev), y.to(dev)
        )


@criterion("fisher", needs_data=True)
def fisher_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """Fisher pruning (Theis et al. 2018): 1/2 w^2 mean_n(g_n^2), per-example gradients.

    g_n is the gradient of example n's loss (torch.func vmap + grad, model in
    eval mode), over ``context.batches`` minibatches.
    """
    ctx = as_context(context)
    weights = _weights(model, mask)
    acc = {k: torch.zeros_like(w) for k, w in weights.items()}
    count = 0
    for x, y in _batches(ctx, "fisher"):
        grads = per_example_grads(model, weights, x, y, ctx.loss_fn)
        for k in acc:
            acc[k] += (grads[k] ** 2).sum(0)
        count += len(y)
    return {k: (0.5 * weights[k].detach() ** 2 * acc[k] / max(count, 1)).cpu() for k in acc}


HESSIAN = ("hutchinson", "exact", "gauss-newton")


@criterion("obd", needs_data=True)
def obd_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """Optimal Brain Damage (LeCun et al. 1990): w^2 * H_ii / 2.

    H_ii is the Hessian diagonal of the loss averaged over ``context.batches``
    minibatches, estimated as option ``hessian`` says:

    - ``exact``: one double backward per weight (small layers; train mode);
    - ``hutchinson`` (default): the mean of v * Hv over ``probes`` (option, 10)
      Rademacher vectors v (train mode);
    - ``gauss-newton``: the diagonal of the generalized Gauss-Newton matrix
      G = mean_n J_n^T H_n J_n, J_n the Jacobian of example n's logits z and
      H_n = diag(p) - p p^T the Hessian of cross-entropy in z (p = softmax(z)).
      Computed exactly per example, not by sampling labels: H_n = A A^T with
      A = diag(sqrt p) - p sqrt(p)^T, so G_ii = mean_n sum_k (d l_k / dw_i)^2
      with l_k = sqrt(p_k) (z_k - p . z), p held fixed: one per-example
      gradient pass (torch.func, eval mode) per class. It assumes a
      cross-entropy loss on logits (``context.loss_fn`` is not used), is never
      negative, and equals the exact Hessian diagonal for weights the logits
      are (piecewise) linear in, e.g. the last Linear layer.
    """
    ctx = as_context(context)
    how = ctx.option("hessian", "hutchinson")
    if how not in HESSIAN:
        raise UsageError(f"unknown hessian estimate '{how}'; choose from: {', '.join(HESSIAN)}")
    weights = _weights(model, mask)
    params = list(weights.values())
    batches = _batches(ctx, "obd")
    diag = [torch.zeros_like(p) for p in params]
    dev = _device(model)
    if how == "gauss-newton":
        for x, _ in batches:
            for d, g in zip(diag, _gauss_newton_diagonal(model, weights, x).values()):
                d += g / (len(x) * len(batches))
        return {k: (0.5 * w.detach() ** 2 * d).cpu() for (k, w), d in zip(weights.items(), diag)}
    if how == "exact":
        limit = int(ctx.option("exact_limit", 20000))
        big = [k for k, p in weights.items() if p.numel() > limit]
        if big:
            raise UsageError(
                f"exact Hessian diagonal is too costly for {', '.join(big)}; use hutchinson"
            )
    with _mode(model, True):
        for x, y in batches:
            out = structure.call(model, structure.to_device(x, dev))
            loss = ctx.loss_fn(out, structure.to_device(y, dev)) / len(batches)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            if how == "exact":
                for d, g, p in zip(diag, grads, params):
                    flat = g.flatten()
                    for i in range(flat.numel()):
                        (row,) = torch.autograd.grad(flat[i], p, retain_graph=True)
                        d.view(-1)[i] += row.view(-1)[i]
            else:
                probes = int(ctx.option("probes", 10))
                for _ in range(probes):
                    vs = [
                        torch.randint(0, 2, p.shape, generator=ctx.generator).to(p) * 2 - 1
                        for p in params
                    ]
                    hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                    for d, v, h in zip(diag, vs, hv):
                        d += v * h / probes
    return {k: (0.5 * w.detach() ** 2 * d).cpu() for (k, w), d in zip(weights.items(), diag)}


def _gauss_newton_diagonal(model: nn.Module, weights: dict, x: torch.Tensor) -> dict:
    """sum over the examples of ``x`` of diag(J_n^T (diag p - p p^T) J_n), by weight name.

    Per class k, the per-example gradient of l_k = sqrt(p_k) (z_k - p . z) with p
    detached; the squares summed over k give the diagonal (see :func:`obd_scores`).
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    names = list(weights)
    dev = _device(model)
    x = x.to(dev)

    def virtual(wsel, xi, k):
        p = dict(params)
        p.update(wsel)
        z = functional_call(model, (p, buffers), (xi.unsqueeze(0),))[0]
        prob = torch.softmax(z, -1).detach()
        return prob[k].sqrt() * (z[k] - (prob * z).sum())

    sel = {k: params[k] for k in names}
    out = {k: torch.zeros_like(params[k]) for k in names}
    with _mode(model, False), torch.no_grad():
        classes = model(x[:1]).shape[-1]
    with _mode(model, False):
        for k in range(classes):
            g = vmap(grad(virtual), in_dims=(None, 0, None))(sel, x, k)
            for n in names:
                out[n] += (g[n] ** 2).sum(0)
    return out


# learned gates -----------------------------------------------------------------------------------

# hard-concrete stretch and temperature of Louizos et al. (2018)
GATE_BETA, GATE_GAMMA, GATE_ZETA = 2.0 / 3.0, -0.1, 1.1
GATE_GRANULARITY = ("weight", "unit")


def gate_open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) of a hard-concrete gate: sigmoid(log_alpha - beta log(-gamma / zeta))."""
    return torch.sigmoid(log_alpha - GATE_BETA * math.log(-GATE_GAMMA / GATE_ZETA))


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A hard-concrete gate z = clamp(s (zeta - gamma) + gamma, 0, 1) for noise u ~ U(0, 1),
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / GATE_BETA)
    return (s * (GATE_ZETA - GATE_GAMMA) + GATE_GAMMA).clamp(0.0, 1.0)


@criterion("gates", needs_data=True)
def gates_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """L0 hard-concrete gates (Louizos, Welling & Kingma 2018), learned on frozen weights.

    Each masked weight (option ``gates_granularity`` = ``weight``, the default)
    or each output unit (``unit``: a Linear row or a conv output channel) gets
    a gate z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta)
    (zeta - gamma) + gamma, 0, 1), u ~ U(0, 1), beta = 2/3, gamma = -0.1,
    zeta = 1.1. Only log_alpha is trained: the weights stay frozen at their
    current values and the forward pass uses w * mask * z (torch.func
    functional_call, train mode: batch statistics, with copied buffers), so
    the model is not changed (dropout, if any, would draw from the global RNG).
    ``gates_steps`` (option, 200) Adam steps (``gates_lr``, 0.1) minimise the
    task loss on the ``context.batches`` minibatches, taken in turn, plus
    ``gates_lambda`` (0.5) times the expected L0 norm per kept weight,
    E[L0] / n = sum P(z != 0) / n over the n weights the mask keeps (a unit's
    gate counts once per kept weight of its row). log_alpha starts at
    log((1 - r) / r), r = ``gates_droprate_init`` (0.5), and u is drawn from
    ``context.generator`` (a fixed seed if none), so the scores are deterministic.

    score = P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)), in float64;
    weights the mask already removed have their gate forced to 0 and score 0.
    """
    ctx = as_context(context)
    granularity = ctx.option("gates_granularity", "weight")
    if granularity not in GATE_GRANULARITY:
        raise UsageError(
            f"unknown gates granularity '{granularity}'; choose from: {', '.join(GATE_GRANULARITY)}"
        )
    steps = int(ctx.option("gates_steps", 200))
    lr = float(ctx.option("gates_lr", 0.1))
    lam = float(ctx.option("gates_lambda", 0.5))
    drop = float(ctx.option("gates_droprate_init", 0.5))
    if steps < 1 or lr <= 0 or lam < 0 or not 0.0 < drop < 1.0:
        raise UsageError("gates need steps >= 1, lr > 0, lambda >= 0 and a droprate-init in (0, 1)")
    if ctx.generator is None:  # deterministic all the same, and the global RNG is left alone
        ctx = dataclasses.replace(ctx, generator=torch.Generator().manual_seed(0))
    from torch.func import functional_call

    weights = _weights(model, mask)
    dev = _device(model)
    batches = [(x.to(dev), y.to(dev)) for x, y in _batches(ctx, "gates")]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    keep = {k: mask[k].to(dev, weights[k].dtype) for k in weights}
    kept_total = sum(float(m.sum()) for m in keep.values())
    init = math.log((1.0 - drop) / drop)

    def gate_shape(w: torch.Tensor) -> tuple[int, ...]:
        return tuple(w.shape) if granularity == "weight" else (w.shape[0], *[1] * (w.dim() - 1))

    log_alpha = {
        k: torch.full(gate_shape(w), init, dtype=w.dtype, device=dev, requires_grad=True)
        for k, w in weights.items()
    }
    opt = torch.optim.Adam(list(log_alpha.values()), lr=lr)
    eps = 1e-6
    with _mode(model, True):
        for t in range(steps):
            x, y = batches[t % len(batches)]
            gated = dict(params)
            for k, la in log_alpha.items():
                u = torch.rand(la.shape, generator=ctx.generator, dtype=la.dtype)
                z = hard_concrete(la, u.clamp(eps, 1.0 - eps).to(dev))
                gated[k] = params[k] * keep[k] * z
            out = functional_call(model, (gated, buffers), (x,))
            l0 = sum((gate_open_probability(la) * keep[k]).sum() for k, la in log_alpha.items())
            loss = ctx.loss_fn(out, y) + lam * l0 / max(kept_total, 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {
        k: (gate_open_probability(la.detach().double()) * keep[k].double())
        .expand(weights[k].shape)
        .cpu()
        .clone()
        for k, la in log_alpha.items()
    }


# trained versus initial weights (Zhou et al. 2019) ------------------------------------------------


def _final_init(model, mask, context, name):
    ctx = as_context(context)
    final = {k: w.detach().cpu() for k, w in _weights(model, mask).items()}
    return final, _init_weights(ctx, list(final), name)


@criterion("large_final", needs_trained=True)
def large_final_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """large_final (Zhou et al. 2019): |w_f|, the trained weight's magnitude."""
    final, _ = _final_init(model, mask, context, "large_final")
    return {k: w.abs() for k, w in final.items()}


@criterion("magnitude_increase", needs_trained=True)
def magnitude_increase_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """magnitude_increase (Zhou et al. 2019): |w_f| - |w_i|."""
    final, init = _final_init(model, mask, context, "magnitude_increase")
    return {k: final[k].abs() - init[k].abs() for k in final}


@criterion("zhou_movement", needs_trained=True)
def zhou_movement_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """movement (Zhou et al. 2019): |w_f - w_i|, how far a weight moved in training."""
    final, init = _final_init(model, mask, context, "zhou_movement")
    return {k: (final[k] - init[k]).abs() for k in final}


def _ranks(t: torch.Tensor) -> torch.Tensor:
    """Within-layer ascending rank (0 = smallest; ties by index)."""
    flat = t.flatten()
    order = torch.argsort(flat, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel())
    return ranks.view_as(t).to(torch.float64)


@criterion("large_init_large_final", needs_trained=True)
def large_init_large_final_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """large_init_large_final (Zhou et al. 2019): both |w_i| and |w_f| large.

    score = min(rank of |w_i|, rank of |w_f|), ranks within the layer among the
    weights ``mask`` keeps: removed ones go to the bottom of both rankings, as the
    reference does, so they shift no kept weight's rank (else, at later levels,
    the removed weights' zero |w_f| would lift every kept |w_f| rank and the
    score would follow |w_i| alone).
    """
    final, init = _final_init(model, mask, context, "large_init_large_final")
    out = {}
    for k in final:
        kept = mask[k].to(final[k].device)
        bottom = torch.full_like(final[k], -math.inf)
        ri = _ranks(torch.where(kept, init[k].abs(), bottom))
        rf = _ranks(torch.where(kept, final[k].abs(), bottom))
        out[k] = torch.minimum(ri, rf)
    return out


@criterion("large_final_same_sign", needs_trained=True)
def large_final_same_sign_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """large_final_same_sign (Zhou et al. 2019): |w_f| where sign(w_f) = sign(w_i), else 0."""
    final, init = _final_init(model, mask, context, "large_final_same_sign")
    return {
        k: torch.where(torch.sign(final[k]) == torch.sign(init[k]), final[k].abs(), 0.0)
        for k in final
    }


# training-time and activation-statistics criteria ------------------------------------------------


@criterion("movement", needs_data=True)
def movement_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """Movement pruning (Sanh et al. 2020): S = -sum_t g_t * w_t, accumulated while training.

    S_ij = -sum_t (dL/dW'_ij)^(t) W_ij^(t), with W' = W * M the masked weight the
    forward pass uses (the straight-through gradient, so pruned weights are scored
    too and can come back); large S = moving away from zero = kept. The sum is
    accumulated by :class:`ticketlab.methods.gradual.MovementPruner` during
    ``ticketlab gradual --criterion movement`` and handed over as the option
    ``movement_scores``; outside training there is nothing to score.
    """
    ctx = as_context(context)
    acc = ctx.option("movement_scores", None)
    if acc is None:
        raise UsageError(
            "criterion 'movement' is accumulated during training; "
            "use ticketlab gradual --criterion movement"
        )
    missing = [k for k in mask.names() if k not in acc]
    if missing:
        raise UsageError(f"no movement scores for: {', '.join(missing)}")
    return {k: acc[k].detach().cpu().clone() for k in mask.names()}


movement_scores.needs_training = True


def _modules_of(model: nn.Module, names) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        m = modules[n.rsplit(".", 1)[0] if "." in n else ""]
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise UsageError(f"{n}: activation criteria support grouped convolutions not yet")
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or n.rpartition(".")[2] != "weight":
            raise UsageError(
                f"{n} ({type(m).__name__}): activation criteria score a weight by the layer's "
                "input features, which only Linear and Conv2d weights multiply; prune it "
                "with another criterion or leave it out of the prunable selection"
            )
        out[n] = m
    return out


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of features: (examples [x positions], in features or channels)."""
    x = x.detach().double()
    if isinstance(module, nn.Conv2d):
        return x.transpose(0, 1).reshape(x.shape[1], -1).T
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def _collect(model: nn.Module, mask: Mask, ctx: Context, name: str, fn) -> dict:
    """Run ``ctx.batches`` training minibatches (eval mode), calling ``fn(state, module, x, z)``."""
    modules = _modules_of(model, mask.names())
    state: dict = {n: {} for n in modules}
    handles = []
    for n, m in modules.items():

        def hook(mod, inputs, output, n=n):
            fn(state[n], mod, inputs[0], output)

        handles.append(m.register_forward_hook(hook))
    dev = _device(model)
    try:
        with _mode(model, False):
            for x, _ in _batches(ctx, name):
                structure.call(model, structure.to_device(x, dev))
    finally:
        for h in handles:
            h.remove()
    return state


def _add(state: dict, key: str, value: torch.Tensor) -> None:
    state[key] = state[key] + value if key in state else value


def input_moments(model: nn.Module, mask: Mask, context=None, name: str = "variance"):
    """Mean and variance of each masked layer's input features over the scoring data.

    Linear: per input feature, over examples; Conv2d: per input channel, over
    examples and positions. Returns ``(means, variances)``, float64, by weight name.
    """
    ctx = as_context(context)

    def fn(st, mod, x, z):
        r = _rows(mod, x)
        _add(st, "n", torch.tensor(float(r.shape[0]), dtype=torch.float64))
        _add(st, "s", r.sum(0).cpu())
        _add(st, "ss", (r * r).sum(0).cpu())

    state = _collect(model, mask, ctx, name, fn)
    means, variances = {}, {}
    for n, st in state.items():
        mean = st["s"] / st["n"]
        means[n] = mean
        variances[n] = (st["ss"] / st["n"] - mean * mean).clamp_min(0.0)
    return means, variances


def _per_input(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-feature (or channel) vector over a weight's shape."""
    return v.view(1, -1, *([1] * (w.dim() - 2)))


@criterion("variance", needs_data=True)
def variance_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """Variance-based pruning with bias compensation: w_ij^2 Var(x_j).

    The mean-squared change of unit i's pre-activation when w_ij is removed
    and its mean contribution w_ij E[x_j] is moved into the bias
    (:func:`compensate_bias`): E[(w_ij (x_j - E x_j))^2] = w_ij^2 Var[x_j].
    Var over training examples (conv: over examples and positions of channel j),
    ``context.batches`` minibatches; the means are left in the option
    ``input_means`` of the context for the compensation.
    """
    ctx = as_context(context)
    weights = _weights(model, mask)
    means, variances = input_moments(model, mask, ctx, "variance")
    ctx.options["input_means"] = means
    return {
        k: (w.detach().double().cpu() ** 2 * _per_input(w, variances[k])).float()
        for k, w in weights.items()
    }


@torch.no_grad()
def compensate_bias(model: nn.Module, old_mask: Mask, new_mask: Mask, means: dict) -> nn.Module:
    """Move the mean contribution of removed weights into the bias: b_i += sum_j w_ij E[x_j].

    Removed = kept by ``old_mask``, pruned by ``new_mask``; ``means`` are the input
    means of :func:`input_moments` (conv: per channel, so a kernel's removed taps
    add w * E[x_c] each; zero padding is ignored). Layers without a bias are left
    as they are. Returns ``model`` (changed in place).
    """
    modules = _modules_of(model, new_mask.names())
    for n, m in modules.items():
        if m.bias is None or n not in means:
            continue
        w = m.weight.detach()
        new = new_mask[n].to(w.device)
        old = old_mask[n].to(w.device) if n in old_mask else torch.ones_like(new)
        removed = old & ~new
        lost = (w.double() * removed * _per_input(w, means[n].to(w.device))).flatten(1).sum(1)
        m.bias.add_(lost.to(m.bias.dtype))
    return model


@criterion("hebbian", needs_data=True)
def hebbian_scores(model: nn.Module, mask: Mask, context=None) -> Scores:
    """Hebbian: |corr(x_j, z_i)|, Pearson correlation of input j with unit i's pre-activation.

    corr = cov(x_j, z_i) / (sd(x_j) sd(z_i)) over training examples (Hebb's
    rule: units that fire together keep their connection); z = the layer's
    output before any nonlinearity. Conv: x_j is one tap of the unfolded input
    patch, z_i the output at that position, over examples and positions.
    Constant inputs or units score 0. ``context.batches`` minibatches.
    """
    ctx = as_context(context)

    def fn(st, mod, x, z):
        if isinstance(mod, nn.Conv2d):
            if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                raise UsageError("hebbian supports numeric zero padding only")
            cols = F.unfold(x.detach(), mod.kernel_size, mod.dilation, mod.padding, mod.stride)
            xr = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
            zr = z.detach().flatten(2).transpose(1, 2).reshape(-1, z.shape[1]).double()
        else:
            xr = x.detach().reshape(-1, x.shape[-1]).double()
            zr = z.detach().reshape(-1, z.shape[-1]).double()
        _add(st, "n", torch.tensor(float(xr.shape[0]), dtype=torch.float64))
        _add(st, "x", xr.sum(0).cpu())
        _add(st, "z", zr.sum(0).cpu())
        _add(st, "xx", (xr * xr).sum(0).cpu())
        _add(st, "zz", (zr * zr).sum(0).cpu())
        _add(st, "zx", (zr.T @ xr).cpu())

    weights = _weights(model, mask)
    state = _collect(model, mask, ctx, "hebbian", fn)
    out = {}
    for k, w in weights.items():
        st = state[k]
        n = st["n"]
        mx, mz = st["x"] / n, st["z"] / n
        cov = st["zx"] / n - mz[:, None] * mx[None, :]
        sx = (st["xx"] / n - mx * mx).clamp_min(0.0).sqrt()
        sz = (st["zz"] / n - mz * mz).clamp_min(0.0).sqrt()
        den = sz[:, None] * sx[None, :]
        corr = torch.where(den > 0, cov / den.clamp_min(1e-300), torch.zeros_like(cov))
        out[k] = corr.abs().clamp(max=1.0).float().view(w.shape)
    return out
