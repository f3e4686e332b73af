"""Masks applied in the forward pass: the dense weights are kept.

The second way of applying a mask (the first is :meth:`ticketlab.masks.Mask.apply_`,
which zeroes weights in place). Supermasks, SupSup and movement pruning need
the dense weights to survive or to come back, so each prunable layer computes
with ``weight * m`` while its ``weight`` parameter stays untouched. ``m`` is a
fixed boolean mask, a function of learnable per-weight scores, or any tensor a
method supplies (SupSup's mixture of masks).

How: every prunable layer is a Linear or a Conv (``masks.PRUNABLE_TYPES``), whose
forward is ``F.linear(x, w, b)`` or ``_conv_forward(x, w, b)``. :func:`attach`
sets an instance ``forward`` that calls the same function with the masked weight.
We chose this over ``torch.nn.utils.parametrize`` and ``nn.utils.prune`` because
both rename the weight (``parametrizations.weight.original``, ``weight_orig``),
so a state dict saved while attached does not load into the plain model; here
the state dict keeps its plain names throughout, ``deepcopy`` works (the
forward is a bound method, rebound to the copy, and the handle is copied
along), and :meth:`MaskedWeights.detach` only deletes what it added. Fixed
masks are non-persistent buffers (they follow ``.to(device)`` but stay out of
the state dict); learnable scores are parameters
named ``weight_scores`` (in the state dict and in ``model.parameters()``, so the
training loop's optimizer and checkpoints pick them up).

Any other prunable parameter (a selection's ``attention`` in-projections, an
``embedding``, a parameter named by a glob), and the ``out_proj`` of a
``MultiheadAttention`` (whose weight the attention reads itself, never calling the
Linear's forward), is masked by the module that reads it: the outermost
``MultiheadAttention`` or Transformer layer above it (their inference fast path reads
every sublayer's weights directly), else its own module gets an instance ``forward`` that
puts ``param * m`` in the parameter's place for the call and the parameter back after
(the gradient reaches the parameter through the product). Its mask and scores are
``<param>_fmask`` and ``<param>_scores`` on the parameter's module.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from . import Mask, prunable_weights

MODES = ("fixed", "topk", "bernoulli", "wiring")
# how a bernoulli mask is evaluated: one binary mask drawn with a seeded generator (as the
# reference samples at test time), the deterministic threshold sigmoid(s) > 0.5, or the
# soft sigmoid(s), which is not a supermask (weights scaled by values in (0, 1))
EVAL_MASKS = ("sampled", "threshold", "expected")


class _TopK(torch.autograd.Function):
    """Keep the top ``density`` of |scores|; straight-through gradient (edge-popup)."""

    @staticmethod
    def forward(ctx, scores: Tensor, density: float) -> Tensor:
        return topk_mask(scores, density).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _TopEdges(torch.autograd.Function):
    """The top ``density`` of |w| in the forward pass; the gradient reaches every weight
    (Discovering Neural Wirings: pruned edges keep learning, so they can come back)."""

    @staticmethod
    def forward(ctx, weight: Tensor, density: float) -> Tensor:
        return weight * topk_mask(weight, density).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def kept_count(numel: int, density: float) -> int:
    """Weights edge-popup keeps in a layer: ``n - floor((1 - k) n)``, as the reference does."""
    return numel - int((1.0 - density) * numel)


def topk_mask(scores: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``kept_count`` largest |scores| of one layer."""
    flat = scores.detach().abs().flatten()
    k = kept_count(flat.numel(), density)
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        out[torch.topk(flat, k, sorted=False).indices] = True
    return out.view_as(scores)


def _linear_forward(self, x):
    return F.linear(x, self._fmask_handle._weight(self._fmask_name, self), self.bias)


def _conv_forward(self, x):
    return self._conv_forward(x, self._fmask_handle._weight(self._fmask_name, self), self.bias)


def _swap_forward(self, *args, **kwargs):
    """The class's forward with each masked parameter it reads replaced by ``param * m``."""
    handle = self._fmask_handle
    saved = []
    try:
        for name in self._fmask_swaps:
            module, pname = handle.modules[name], handle.pnames[name]
            p = module._parameters[pname]
            saved.append((module, pname, p))
            # a plain tensor in the parameter's slot for this call: attribute reads see it
            module._parameters[pname] = p * handle._factor(name, module)
        return type(self).forward(self, *args, **kwargs)
    finally:
        for module, pname, p in saved:
            module._parameters[pname] = p


# Modules that read their sublayers' weights themselves: MultiheadAttention its out_proj's;
# the Transformer layers all of theirs, on their inference fast path (eval, no grad).
READ_DIRECTLY = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)


def _attr(pname: str, suffix: str) -> str:
    """``weight_fmask``/``weight_scores`` for a weight, ``<param>_fmask`` for others."""
    return f"{pname}_{suffix}"


def _caller(model: nn.Module, name: str, modules: dict) -> tuple[str, bool]:
    """The module whose forward must mask parameter ``name``, and whether it is the
    parameter's own Linear or Conv layer (masked by the usual instance forward)."""
    mod_name, _, pname = name.rpartition(".")
    parts = mod_name.split(".") if mod_name else []
    attention = None  # the outermost attention that contains it
    for i in range(len(parts) + 1):
        prefix = ".".join(parts[:i])
        if isinstance(modules[prefix], READ_DIRECTLY):
            attention = prefix
            break
    if attention is not None:
        return attention, False
    owner = modules[mod_name]
    own = pname == "weight" and isinstance(owner, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    return mod_name, own


class MaskedWeights:
    """The handle of a forward-pass mask on a model (see :func:`attach`).

    ``mode`` is ``fixed`` (a boolean mask), ``topk`` (edge-popup: the top
    ``density`` of |scores| per layer, straight-through gradient) or
    ``bernoulli`` (Zhou et al.: a mask sampled from sigmoid(scores) in training,
    straight-through gradient; ``rescale`` multiplies each layer by
    numel / kept of the realised mask) or ``wiring`` (Discovering Neural Wirings,
    Wortsman et al. 2019: the weights are their own scores, the top ``density`` of
    |w| per layer act in the forward pass and every weight gets the gradient of its
    edge, so an edge outside the top k keeps learning and comes in once its |w| does).

    A bernoulli handle evaluates (module not training) one binary mask, the one
    :meth:`current_mask` returns: with ``eval_mask="sampled"`` it is ``u < sigmoid(s)``
    for uniforms ``u`` drawn once from ``eval_seed`` (the same draw at every
    evaluation, so each evaluation scores one supermask and a resumed run scores the
    same one); with ``"threshold"``, ``sigmoid(s) > 0.5``. ``"expected"`` multiplies by
    sigmoid(s) itself: a soft mask, not a supermask.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        density: float,
        eval_mask: str,
        rescale: bool,
        eval_seed: int = 0,
    ):
        self.model = model
        self.mode = mode
        self.density = density
        self.eval_mask = eval_mask
        self.rescale = rescale
        self.eval_seed = eval_seed
        self.generator: torch.Generator | None = None
        self._eval_u: dict[str, Tensor] | None = None
        self.modules: dict[str, nn.Module] = {}  # the module holding each masked parameter
        self.pnames: dict[str, str] = {}  # the parameter's name in it
        self._callers: list[nn.Module] = []  # modules given an instance forward
        self._override: dict[str, Tensor] | None = None
        self._attached = False

    # what each layer computes with -----------------------------------------
    def _weight(self, name: str, module: nn.Module) -> Tensor:
        if self.mode == "wiring" and self._override is None:
            return _TopEdges.apply(self.weight(name), self.density)
        return module.weight * self._factor(name, module)

    def _factor(self, name: str, module: nn.Module) -> Tensor:
        if self._override is not None:
            return self._override[name]
        if self.mode == "fixed":
            return self._mask_of(name)
        scores = self._scores_of(name)
        if self.mode == "topk":
            # through abs, as the reference ranks |scores|: d|s|/ds = sign(s)
            return _TopK.apply(scores.abs(), self.density)
        p = torch.sigmoid(scores)
        if module.training:
            u = torch.rand(p.shape, device=p.device, generator=self.generator)
            m = (u < p).to(p.dtype) + p - p.detach()  # straight-through
        elif self.eval_mask == "expected":
            m = p
        else:
            m = self._binary(name, scores).to(p.dtype)
        if self.rescale:
            kept = m.detach().sum().clamp_min(1.0)
            m = m * (m.numel() / kept)
        return m

    def _binary(self, name: str, scores: Tensor) -> Tensor:
        """The evaluated bernoulli mask of one layer (see the class docstring)."""
        if self.eval_mask == "threshold" or self.eval_mask == "expected":
            return scores.detach() > 0  # sigmoid(s) > 0.5
        if self._eval_u is None:  # all layers at once, in a fixed order: call order is moot
            gen = torch.Generator().manual_seed(self.eval_seed)
            self._eval_u = {
                n: torch.rand(self._scores_of(n).shape, generator=gen) for n in self.modules
            }
        u = self._eval_u[name].to(scores.device)
        return u < torch.sigmoid(scores.detach())

    def _mask_of(self, name: str) -> Tensor:
        return getattr(self.modules[name], _attr(self.pnames[name], "fmask"))

    def _scores_of(self, name: str) -> Tensor:
        return getattr(self.modules[name], _attr(self.pnames[name], "scores"))

    # public ------------------------------------------------------------------
    def weight(self, name: str) -> nn.Parameter:
        """The dense parameter behind masked ``name``."""
        return self.modules[name]._parameters[self.pnames[name]]

    @property
    def scores(self) -> dict[str, nn.Parameter]:
        return {
            n: self._scores_of(n)
            for n, m in self.modules.items()
            if hasattr(m, _attr(self.pnames[n], "scores"))
        }

    def names(self) -> list[str]:
        return list(self.modules)

    def set_mask(self, mask: Mask) -> None:
        """Replace the fixed masks (mode ``fixed``); layers the mask does not name are dense."""
        self._need_attached()
        if self.mode != "fixed":
            raise UsageError(
                f"set_mask needs a fixed mask; this handle learns scores ({self.mode})"
            )
        unknown = [k for k in mask.names() if k not in self.modules]
        if unknown:
            raise UsageError(f"mask names weights the model does not mask: {', '.join(unknown)}")
        for name in self.modules:
            w = self.weight(name)
            m = mask[name] if name in mask else torch.ones(w.shape, dtype=torch.bool)
            if tuple(m.shape) != tuple(w.shape):
                raise UsageError(f"mask for {name} has shape {tuple(m.shape)}, weight {w.shape}")
            self._mask_of(name).copy_(m.to(device=w.device, dtype=w.dtype))
        self._override = None

    def set_factors(self, factors: dict[str, Tensor] | None) -> None:
        """Multiply each layer by these tensors instead (they may carry gradients); None: undo."""
        self._need_attached()
        if factors is not None and sorted(factors) != sorted(self.modules):
            raise UsageError("set_factors needs one tensor per masked layer")
        self._override = factors

    @torch.no_grad()
    def current_mask(self) -> Mask:
        """The mask in use now: the top-k of scores, or the bernoulli mask evaluation scores
        (sampled from ``eval_seed`` or thresholded; ``expected`` saves the threshold)."""
        self._need_attached()
        out = {}
        for name in self.modules:
            if self.mode == "fixed":
                out[name] = self._mask_of(name) != 0
            elif self.mode == "topk":
                out[name] = topk_mask(self._scores_of(name), self.density)
            elif self.mode == "wiring":
                out[name] = topk_mask(self.weight(name), self.density)
            else:
                out[name] = self._binary(name, self._scores_of(name))
        return Mask({k: v.cpu() for k, v in out.items()})

    def expected_density(self) -> float:
        """Bernoulli: the mean keep probability over all masked weights; else the mask's density."""
        if self.mode != "bernoulli":
            return self.current_mask().density()
        with torch.no_grad():
            total = sum(float(torch.sigmoid(s).sum()) for s in self.scores.values())
        return total / sum(s.numel() for s in self.scores.values())

    @torch.no_grad()
    def detach(self, bake: bool = False) -> nn.Module:
        """Remove the forward mask; ``bake`` writes weight * mask into the weights."""
        self._need_attached()
        mask = self.current_mask() if bake else None
        for name, module in self.modules.items():
            w = self.weight(name)
            if bake:
                w.mul_(mask[name].to(device=w.device, dtype=w.dtype))
            for attr in ("forward", "_fmask_handle", "_fmask_name"):
                module.__dict__.pop(attr, None)
            for attr in (_attr(self.pnames[name], "fmask"), _attr(self.pnames[name], "scores")):
                module._buffers.pop(attr, None)
                module._parameters.pop(attr, None)
        for caller in self._callers:
            for attr in ("forward", "_fmask_handle", "_fmask_swaps"):
                caller.__dict__.pop(attr, None)
        self._attached = False
        self._override = None
        return self.model

    def _need_attached(self) -> None:
        if not self._attached:
            raise UsageError("this forward mask has been detached")

    def __enter__(self) -> MaskedWeights:
        return self

    def __exit__(self, *exc) -> None:
        if self._attached:
            self.detach(bake=False)


def score_init(weight: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Edge-popup's score init: kaiming uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), ...)."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    bound = 1.0 / math.sqrt(fan_in)
    draw = torch.empty(weight.shape, dtype=weight.dtype)
    draw.uniform_(-bound, bound, generator=generator)
    return draw.to(weight.device)


def attach(
    model: nn.Module,
    mask: Mask | None = None,
    scores: dict[str, Tensor] | None = None,
    *,
    mode: str | None = None,
    density: float = 0.5,
    eval_mask: str = "sampled",
    rescale: bool = False,
    names: list[str] | None = None,
    eval_seed: int = 0,
) -> MaskedWeights:
    """Make every prunable weight (or those in ``names``) compute as ``weight * m`` in forward.

    With ``mask`` (or nothing: all ones), ``m`` is that fixed boolean mask. With
    ``scores`` (one tensor per masked weight, same shapes), ``m`` is learned:
    ``mode="topk"`` (the default with scores) or ``"bernoulli"``; the scores
    become trainable parameters ``<layer>.weight_scores``. ``mode="wiring"`` (no mask,
    no scores) keeps the top ``density`` of each layer's |w| in the forward pass and
    passes the gradient to every weight (DNW); the state dict stays the plain model's.
    """
    mode = mode or ("fixed" if scores is None else "topk")
    if mode not in MODES:
        raise UsageError(f"unknown forward-mask mode '{mode}'; choose from: {', '.join(MODES)}")
    if mode in ("fixed", "wiring") and scores is not None:
        raise UsageError("scores need mode topk or bernoulli")
    if mode == "wiring" and mask is not None:
        raise UsageError("mode wiring ranks the weights themselves: give no mask")
    if mode in ("topk", "bernoulli") and (scores is None or mask is not None):
        raise UsageError(f"mode {mode} needs scores (and no fixed mask)")
    if eval_mask not in EVAL_MASKS:
        raise UsageError(f"unknown eval mask '{eval_mask}'; choose from: {', '.join(EVAL_MASKS)}")
    if not 0.0 < density <= 1.0:
        raise UsageError(f"density must be in (0, 1]; got {density}")
    weights = prunable_weights(model)
    if names is not None:  # any parameters, e.g. those a mask made with a selection names
        weights = dict(model.named_parameters())
        missing = [n for n in names if n not in weights]
        if missing:
            raise UsageError(f"not prunable weights: {', '.join(missing)}")
        weights = {n: weights[n] for n in names}
    if scores is not None:
        if sorted(scores) != sorted(weights):
            raise UsageError("scores must name exactly the masked weights")
    modules = dict(model.named_modules())
    handle = MaskedWeights(model, mode, density, eval_mask, rescale, eval_seed)
    swaps: dict[str, list[str]] = {}
    for name, w in weights.items():
        mod_name, _, pname = name.rpartition(".")
        module = modules[mod_name]
        mask_attr, scores_attr = _attr(pname, "fmask"), _attr(pname, "scores")
        caller, own = _caller(model, name, modules)
        if (
            hasattr(module, mask_attr)
            or hasattr(module, scores_attr)
            or ("forward" in modules[caller].__dict__ and caller not in swaps)
        ):
            raise UsageError(f"{name} already has a forward mask or its own forward")
        if mode == "fixed":
            module.register_buffer(
                mask_attr, torch.ones(w.shape, dtype=w.dtype, device=w.device), persistent=False
            )
        elif mode != "wiring":
            s = scores[name]
            if tuple(s.shape) != tuple(w.shape):
                raise UsageError(f"scores for {name} have shape {tuple(s.shape)}, weight {w.shape}")
            param = nn.Parameter(s.detach().to(device=w.device, dtype=w.dtype).clone())
            module.register_parameter(scores_attr, param)
        handle.modules[name], handle.pnames[name] = module, pname
        if own:
            # a bound method (not a closure) so that deepcopy rebinds it to the copy
            fwd = _linear_forward if isinstance(module, nn.Linear) else _conv_forward
            module._fmask_handle, module._fmask_name = handle, name
            module.forward = types.MethodType(fwd, module)
        else:
            swaps.setdefault(caller, []).append(name)
    for caller, names in swaps.items():
        c = modules[caller]
        c._fmask_handle, c._fmask_swaps = handle, tuple(names)
        c.forward = types.MethodType(_swap_forward, c)
        handle._callers.append(c)
    handle._attached = True
    if mode == "fixed" and mask is not None:
        handle.set_mask(mask)
    return handle


__all__ = [
    "EVAL_MASKS",
    "MODES",
    "MaskedWeights",
    "attach",
    "kept_count",
    "score_init",
    "topk_mask",
]
