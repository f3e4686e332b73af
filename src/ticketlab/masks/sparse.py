"""CSR layers and kernels for training at low density.

The masked dense path (:class:`~ticketlab.masks.MaskKeeper`) costs what a dense network
costs. Below a density threshold, a Linear layer is cheaper through sparse kernels, with
its kept weights in one values tensor and its mask as a fixed CSR pattern:

- forward: ``y = (W_csr @ x.T).T + b``, the CSR matrix on the left (``x @ W_csr.T`` is
  10-100x slower on CPU);
- input gradient: ``dx = (W.T_csr @ dy.T).T`` through the transposed pattern (its values
  are a gather of the kept values, ``values[t_perm]``); skipped when the input needs no
  gradient (the first layer);
- weight gradient: ``torch.sparse.sampled_addmm`` of ``dy.T @ x`` on the mask's pattern,
  so only the kept entries are computed; bias gradient ``dy.sum(0)``.

:class:`SparseKernels` runs a training phase that way. It installs an instance ``forward``
on each chosen Linear (as :mod:`ticketlab.masks.forward` does: names and the state dict
stay plain) and builds a second optimizer, of the same kind and settings, whose
parameters are the values tensors in place of those layers' weights (the others as they
are, at the same positions): the optimizer state of a sparse layer lives on its kept
entries only. Pruned weights of the masked dense path are zero and stay zero, and their
optimizer state never reaches a kept weight, so weight decay, momentum and Adam give the
kept weights what the dense path gives them, up to float summation order.

The model's dense parameters and the caller's optimizer stay the reference:
:meth:`SparseKernels.write_back` scatters the values (zeros elsewhere) and the optimizer
state into them, so checkpoints have the dense path's format (either kernels can resume
them; the training loop keeps the phase's recorded choice, so a resumed run is exact),
and evaluation, saved weights and everything downstream see a plain model;
:meth:`SparseKernels.close` does it at the end of the phase. A callback that changes the
mask (SET, RigL) gets the dense model at its update steps (:meth:`SparseKernels.dense_view`)
and the CSR layers are rebuilt from the new mask after it.

Which layers: :func:`choose_kernels`. ``dense`` uses none; ``sparse`` every masked Linear
layer that is not fully dense; ``auto`` (the default) those on the CPU below
:data:`AUTO_MAX_DENSITY` density with at least :data:`AUTO_MIN_WEIGHTS` weights where a
short timing at the start of the phase (one layer's forward, backward and optimizer step
at the phase's batch size, less what any call costs) finds the CSR kernels at least
:data:`AUTO_GAIN` times faster. So dense phases time nothing and pay nothing, and
near-ties stay dense. The choice is by timing, so it can differ between machines (or, for
a layer near the tie, between runs): the result row records it (``kernels``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import structure
from ..errors import UsageError
from ..spec import KERNELS
from . import Mask, MaskKeeper

# auto: only layers this sparse are timed; above it dense kernels win at training batch sizes
AUTO_MAX_DENSITY = 0.2
# auto: smaller layers cost microseconds dense, less than the sparse kernels' fixed costs
AUTO_MIN_WEIGHTS = 10_000
# auto: the sparse kernels must time this many times faster (near-ties stay dense, so the
# choice rarely flips between runs)
AUTO_GAIN = 1.2
# auto: where the kernels are measured and tested (elsewhere: "sparse" asks for them)
AUTO_DEVICES = ("cpu",)


_quiet = False


def _quiet_beta_notice() -> None:
    """torch warns once per process that CSR tensors are in beta: take that one warning
    here, silenced, so that training does not print it."""
    global _quiet
    if not _quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.sparse_csr_tensor(
                torch.zeros(2, dtype=torch.int32),
                torch.zeros(0, dtype=torch.int32),
                torch.zeros(0),
                (1, 1),
                check_invariants=False,
            )
        _quiet = True


class Pattern:
    """A 2-D mask as CSR structure: row pointers and columns of the kept entries (row-major),
    their flat positions in the dense weight, and the transposed pattern with the
    permutation that orders the kept values for it."""

    def __init__(self, mask: Tensor, device: torch.device):
        _quiet_beta_notice()
        m = mask.to(device=device, dtype=torch.bool)
        rows, cols = m.shape
        self.shape = (rows, cols)
        self.flat = m.flatten().nonzero().flatten()  # row-major: the CSR order
        r, c = self.flat // cols, self.flat % cols
        # 32-bit indices: what MKL's sparse kernels take (64-bit ones are converted per call)
        index = torch.int32 if max(rows, cols, self.flat.numel()) < 2**31 else torch.int64
        counts = torch.bincount(r, minlength=rows)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(index)
        self.col = c.to(index)
        # W.T in CSR: its rows are W's columns; sort the kept entries by (column, row)
        order = torch.argsort(c * rows + r)
        t_counts = torch.bincount(c, minlength=cols)
        self.t_crow = torch.cat([t_counts.new_zeros(1), t_counts.cumsum(0)]).to(index)
        self.t_col = r[order].to(index)
        self.t_perm = order
        self.nnz = int(self.flat.numel())

    def matrix(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(
            self.crow, self.col, values, self.shape, check_invariants=False
        )

    def matrix_t(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(
            self.t_crow,
            self.t_col,
            values.index_select(0, self.t_perm),
            (self.shape[1], self.shape[0]),
            check_invariants=False,
        )


class CSRWeight:
    """The CSR matrices of ``values`` on ``pattern``, made once: ``w`` shares the storage
    of ``values`` (so the optimizer's in-place steps show in it), and ``transposed()``
    refreshes W.T's values, a gather of them, in a buffer of its own."""

    def __init__(self, pattern: Pattern, values: Tensor):
        self.pattern = pattern
        self._values = values.detach()
        self.w = pattern.matrix(self._values)
        self._t_values = torch.empty_like(self._values)
        self._w_t = torch.sparse_csr_tensor(
            pattern.t_crow,
            pattern.t_col,
            self._t_values,
            (pattern.shape[1], pattern.shape[0]),
            check_invariants=False,
        )

    def transposed(self) -> Tensor:
        torch.index_select(self._values, 0, self.pattern.t_perm, out=self._t_values)
        return self._w_t


class SparseLinearFn(torch.autograd.Function):
    """``x @ W.T + b`` with W given by its kept ``values`` (and their CSR matrices,
    ``weight``)."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None, weight: CSRWeight):
        # the kernels want x.T row-major; the weight gradient takes the same copy
        x_t = x.t().contiguous()
        out_t = weight.w @ x_t  # (out, B)
        ctx.save_for_backward(x_t, values)
        ctx.weight = weight
        y = out_t.t()
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_t, values = ctx.saved_tensors
        weight: CSRWeight = ctx.weight
        grad_t = grad.t().contiguous()  # no copy past the first layer: y was made as y_t.t()
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            gx = (weight.transposed() @ grad_t).t()
        if ctx.needs_input_grad[1]:
            # (dy.T @ x) at the kept entries only; sampled_addmm reads x column-major
            gv = torch.sparse.sampled_addmm(weight.w, grad_t, x_t.t(), beta=0.0).values()
        if ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gv, gb, None


def sparse_linear(
    x: Tensor, values: Tensor, bias: Tensor | None, weight: Pattern | CSRWeight
) -> Tensor:
    """The functional form: any leading dimensions, as ``F.linear``. ``weight`` is the
    pattern, or (faster, made once per ``values``) its :class:`CSRWeight`."""
    if isinstance(weight, Pattern):
        weight = CSRWeight(weight, values)
    if x.dim() == 2:
        return SparseLinearFn.apply(x, values, bias, weight)
    lead = x.shape[:-1]
    y = SparseLinearFn.apply(x.reshape(-1, x.shape[-1]), values, bias, weight)
    return y.reshape(*lead, weight.pattern.shape[0])


class _Layer:
    """One Linear trained through CSR kernels: its pattern and kept values."""

    def __init__(self, module: nn.Linear, mask: Tensor):
        w = module.weight
        self.module = module
        self.pattern = Pattern(mask, w.device)
        self.values = w.detach().reshape(-1).index_select(0, self.pattern.flat)
        self.values.requires_grad_(True)
        self.csr = CSRWeight(self.pattern, self.values)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # the common case, without the wrapper's checks
            return SparseLinearFn.apply(x, self.values, self.module.bias, self.csr)
        return sparse_linear(x, self.values, self.module.bias, self.csr)

    @torch.no_grad()
    def write_back(self) -> None:
        w = self.module.weight
        w.zero_()
        w.view(-1).index_copy_(0, self.pattern.flat, self.values.detach())


def sparsifiable(model: nn.Module, mask: Mask) -> dict[str, nn.Linear]:
    """The masked Linear weights CSR kernels can take over, by parameter name: plain
    ``nn.Linear`` (not a subclass with its own forward) with no forward of its own
    installed (as :mod:`ticketlab.masks.forward` installs) and no hooks, whose weight is
    trained, float, contiguous, used by no other module, and not fully dense."""
    # MultiheadAttention reads its out_proj's weight itself, never calling its forward
    inside = {
        f"{n}.{c}" if n else c
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_modules()
        if c
    }
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out = {}
    for mod_name, module in model.named_modules():
        name = f"{mod_name}.weight" if mod_name else "weight"
        if name not in mask or type(module).forward is not nn.Linear.forward:
            continue
        if mod_name in inside:
            continue
        if "forward" in module.__dict__ or not isinstance(module, nn.Linear):
            continue
        if module._forward_hooks or module._forward_pre_hooks:
            continue
        w = module.weight
        if w.dim() != 2 or not w.dtype.is_floating_point or not w.is_contiguous():
            continue
        if not w.requires_grad or uses[id(w)] > 1:  # frozen, or tied to another layer
            continue
        if bool(mask[name].all()):
            continue
        out[name] = module
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, reps: int = 7) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_layer(
    module: nn.Linear,
    mask: Tensor,
    x: Tensor,
    needs_input_grad: bool,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
) -> tuple[float, float]:
    """Seconds that one training step of ``module`` on ``x`` adds: (dense, sparse).

    Dense is the masked dense path: ``F.linear`` forward and backward, an optimizer step
    over the whole weight and the mask's multiply; sparse is the CSR kernels on ``mask``
    and a step over the kept values. Both compute the weight (and bias) gradient, and the
    input gradient when the layer's input needs one in training. With no
    ``make_optimizer``, no optimizer step is timed."""
    w = module.weight.detach().clone().requires_grad_(True)
    b = None if module.bias is None else module.bias.detach().clone().requires_grad_(True)
    x = x.detach().clone().requires_grad_(needs_input_grad)
    keep = mask.to(device=w.device, dtype=w.dtype)
    layer = _Layer(module, mask)
    values = layer.values
    # a generator of its own: the global RNG stream (dropout, checkpoints) is left alone
    gen = torch.Generator(device=w.device).manual_seed(0)
    grad = torch.randn(x.shape[0], w.shape[0], generator=gen, device=w.device, dtype=w.dtype)
    step_dense = step_sparse = None
    if make_optimizer is not None:
        step_dense, step_sparse = make_optimizer([w]).step, make_optimizer([values]).step

    def dense() -> None:
        w.grad = None
        x.grad = None
        F.linear(x, w, b).backward(grad)
        if step_dense is not None:
            step_dense()
            with torch.no_grad():
                w.mul_(keep)

    # past the first layer, in a chain of CSR layers, activations and their gradients come
    # transposed (the kernels' own layout), so no copy is made for them: time it that way
    x_s = x.detach().t().contiguous().t() if needs_input_grad else x.detach()
    x_s.requires_grad_(needs_input_grad)
    grad_s = grad.t().contiguous().t()

    def sparse() -> None:
        values.grad = None
        x_s.grad = None
        SparseLinearFn.apply(x_s, values, b, layer.csr).backward(grad_s)
        if step_sparse is not None:
            step_sparse()

    # What one call costs whatever the layer (starting autograd's engine, the optimizer's
    # Python work), which a training step pays once, not per layer: taken off both.
    w0 = torch.zeros(1, 1, device=w.device, dtype=w.dtype, requires_grad=True)
    x0, g0 = x[:, :1].detach(), grad[:, :1]
    step_base = make_optimizer([w0]).step if make_optimizer is not None else None

    def base() -> None:
        w0.grad = None
        F.linear(x0, w0).backward(g0)
        if step_base is not None:
            step_base()

    # alternate, so a slow spell of a shared machine hits both
    d1, s1, o1 = _time(dense, w.device), _time(sparse, w.device), _time(base, w.device)
    d2, s2, o2 = _time(dense, w.device), _time(sparse, w.device), _time(base, w.device)
    overhead = min(o1, o2)
    return max(min(d1, d2) - overhead, 0.0), max(min(s1, s2) - overhead, 1e-9)


def layer_inputs(model: nn.Module, modules: dict[str, nn.Module], x: Tensor) -> dict:
    """Each named module's input on the batch ``x`` (2-D) and whether, in training, it
    needs a gradient (it does past the first parameter). The forward runs in eval mode,
    so that nothing (BatchNorm statistics, dropout's random draws) changes."""
    seen: dict[str, tuple[Tensor, bool]] = {}
    handles = []
    for name, module in modules.items():

        def hook(mod, args, name=name):
            inp = args[0]
            seen.setdefault(name, (inp.detach().reshape(-1, inp.shape[-1]), inp.requires_grad))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.enable_grad():
            structure.call(model, x)
    finally:
        for h in handles:
            h.remove()
    return seen


def choose_kernels(
    model: nn.Module,
    mask: Mask | None,
    kernels: str,
    x: Tensor,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
) -> list[str]:
    """The weight names of the layers to train through CSR kernels, given the ``kernels``
    setting, a training batch ``x`` and the phase's optimizer (``make_optimizer(params)``,
    timed with the layers by ``auto``); see the module docstring."""
    if kernels not in KERNELS:
        raise UsageError(f"unknown kernels '{kernels}'; choose from: {', '.join(KERNELS)}")
    if mask is None or kernels == "dense":
        return []
    candidates = sparsifiable(model, mask)
    if kernels == "sparse":
        return list(candidates)
    candidates = {
        n: m
        for n, m in candidates.items()
        if m.weight.numel() >= AUTO_MIN_WEIGHTS
        and float(mask[n].float().mean()) < AUTO_MAX_DENSITY
        and m.weight.device.type in AUTO_DEVICES
    }
    if not candidates:
        return []
    was_training = model.training
    model.eval()
    try:
        inputs = layer_inputs(model, candidates, x)
        chosen = []
        for name, module in candidates.items():
            if name not in inputs:  # not reached by the forward pass
                continue
            inp, needs_grad = inputs[name]
            dense, sparse = time_layer(module, mask[name], inp, needs_grad, make_optimizer)
            if sparse * AUTO_GAIN <= dense:
                chosen.append(name)
    finally:
        model.train(was_training)
    return chosen


class SparseKernels:
    """A training phase with the ``layers`` of ``model`` (weight names) on CSR kernels.

    ``optimizer`` is the phase's optimizer over the dense parameters (the reference, and
    what checkpoints save); ``make_optimizer(params)`` builds one of the same kind over a
    list of tensors. :attr:`optimizer` is the one to step: the same parameters in the same
    order, the values tensors in place of the sparse layers' weights. :meth:`keep` keeps
    the mask of the masked layers left on dense kernels (call it after each step).

    ``callbacks`` of the training loop may run beside the kernels when they say at which
    steps they need the dense model (``dense_view(step) -> bool``): at those steps
    :meth:`dense_view` writes everything back, restores the dense forward and afterwards
    rebuilds the sparse layers from ``keeper``'s mask (which the callback may have
    changed) and the dense weights and optimizer state.
    """

    def __init__(
        self,
        model: nn.Module,
        mask: Mask,
        layers: Iterable[str],
        optimizer: torch.optim.Optimizer,
        make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
        callbacks: Iterable = (),
    ):
        self.model = model
        self.modules = sparsifiable(model, mask)
        self.names = [n for n in mask.names() if n in set(layers) and n in self.modules]
        self.dense_optimizer = optimizer
        self.make_optimizer = make_optimizer
        self.views = [c.dense_view for c in callbacks if hasattr(c, "dense_view")]
        self.layers: dict[str, _Layer] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.keeper: MaskKeeper | None = None
        self._build(mask)

    # building and writing back ---------------------------------------------------------

    def _build(self, mask: Mask) -> None:
        """Values, patterns and the sparse optimizer from the dense weights and state."""
        self.layers = {n: _Layer(self.modules[n], mask[n]) for n in self.names}
        by_weight = {id(self.modules[n].weight): self.layers[n] for n in self.names}
        dense_params = [p for g in self.dense_optimizer.param_groups for p in g["params"]]
        params = [by_weight[id(p)].values if id(p) in by_weight else p for p in dense_params]
        self.optimizer = self.make_optimizer(params)
        self._copy_groups(self.dense_optimizer, self.optimizer)
        for p, q in zip(dense_params, params):
            state = self.dense_optimizer.state.get(p)
            if not state:
                continue
            if q is p:
                self.optimizer.state[q] = state
                continue
            flat = by_weight[id(p)].pattern.flat
            self.optimizer.state[q] = {
                k: (
                    (v.reshape(-1).index_select(0, flat) if v.shape == p.shape else v.clone())
                    if torch.is_tensor(v)
                    else v
                )
                for k, v in state.items()
            }
        self._dense_params, self._params = dense_params, params
        rest = {n: m for n, m in mask.items() if n not in self.layers}
        self.keeper = MaskKeeper(self.model, Mask(rest) if rest else None)
        for name, layer in self.layers.items():
            self.modules[name].forward = layer.forward

    @staticmethod
    def _copy_groups(src: torch.optim.Optimizer, dst: torch.optim.Optimizer) -> None:
        for gs, gd in zip(src.param_groups, dst.param_groups):
            for k, v in gs.items():
                if k != "params":
                    gd[k] = v

    @torch.no_grad()
    def write_back(self) -> None:
        """Scatter the kept values into the dense weights (zeros elsewhere) and the sparse
        optimizer's state and settings into the dense optimizer."""
        for layer in self.layers.values():
            layer.write_back()
        self._copy_groups(self.optimizer, self.dense_optimizer)
        for p, q in zip(self._dense_params, self._params):
            state = self.optimizer.state.get(q)
            if not state:
                continue
            if q is p:
                self.dense_optimizer.state[p] = state
                continue
            flat = self._layer_of(p).pattern.flat
            old = self.dense_optimizer.state.get(p, {})
            new = {}
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() == 1 and v.shape == q.shape:
                    buf = old.get(k)
                    if not (torch.is_tensor(buf) and buf.shape == p.shape):
                        buf = torch.zeros_like(p)
                    buf.reshape(-1).index_copy_(0, flat, v)
                    new[k] = buf
                else:
                    new[k] = v.clone() if torch.is_tensor(v) else v
            self.dense_optimizer.state[p] = new

    def _layer_of(self, p: Tensor) -> _Layer:
        for name, layer in self.layers.items():
            if self.modules[name].weight is p:
                return layer
        raise KeyError("not a sparse layer's weight")

    def _uninstall(self) -> None:
        for name in self.layers:
            self.modules[name].__dict__.pop("forward", None)

    # the loop's view -------------------------------------------------------------------

    def keep(self) -> None:
        """Re-zero the pruned weights of the masked layers on dense kernels."""
        self.keeper()

    def needs_dense(self, step: int) -> bool:
        return any(view(step) for view in self.views)

    @contextlib.contextmanager
    def dense_view(self, keeper: MaskKeeper | None = None):
        """The dense model and optimizer, up to date, with the dense forward; afterwards
        the sparse layers again: rebuilt from ``keeper.mask`` and the dense weights and
        state when ``keeper`` is given (a callback may have changed any of them), else
        as they were."""
        self.write_back()
        self._uninstall()
        try:
            yield
        finally:
            if keeper is not None and keeper.mask is not None:
                self._build(keeper.mask)
            else:
                for name, layer in self.layers.items():
                    self.modules[name].forward = layer.forward

    def close(self) -> None:
        """End of the phase: the dense weights and optimizer hold everything."""
        self.write_back()
        self._uninstall()

    def summary(self) -> str:
        """What the phase ran on: ``dense`` or ``sparse:<weight names>``."""
        return "sparse:" + ",".join(self.names) if self.names else "dense"
