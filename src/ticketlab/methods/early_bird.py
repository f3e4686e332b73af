"""Early-bird tickets (You et al. 2020): the building blocks.

Training adds an L1 penalty on the BatchNorm scales (network slimming): its
subgradient ``s * sign(gamma)`` is added to each BN weight's gradient before
the optimizer step (:class:`BNL1Penalty`). After each epoch a channel mask at
pruning ratio p is drawn from one global threshold over all BN |gamma|
(:func:`channel_mask`); the last 5 masks are kept, and a ticket is drawn when
the queue is full and the normalised Hamming distance of the newest mask to
each of the 4 others is <= 0.1 (:class:`EarlyBirdDetector`). A channel mask
expands to weight masks of the convolutions that feed the BN layers
(:func:`expand_channel_mask`). :class:`EarlyBirdWatch` runs the detector in
the training loop.

:class:`EarlyBirdExperiment` (``ticketlab early-bird``) puts them together: per
replicate, the search (level 0, variant ``search``) trains the dense network
with the L1 penalty and the watch, and stops at the draw, at step t; the ticket
(level 1, variant ``ticket``) is the pruned network, starting from the
drawing-epoch weights (``retrain_from="draw"``) or from the initialisation
(``"init"``). How it is retrained is ``retrain``:

- ``"continue"`` (the default; the reference's ``retrain_continue.sh``, ``main_c.py
  --start-epoch t --sparsity-regularization``): steps ``[t, T)`` of the same budget,
  the LR schedule and the data order going on from step t, the L1 penalty on the
  BN scales kept, a fresh optimizer (as there). Search and retraining together take
  one budget T. (The reference's README fine-tunes the ticket "from emergence
  epoch", which ``retrain_from="draw"`` does; its ``main_c.py`` as published builds
  the pruned network anew and copies no weights into it.)
- ``"restart"``: steps ``[0, T)`` with the schedule started again and no L1
  term, so search plus retraining take t + T steps.

A ticket drawn at the end of the budget (t = T) has nothing left to train in
``"continue"``: its row is the pruned network evaluated as drawn (``steps`` 0).
A channel ticket is physically smaller when the structured path
can remove its channels layer by layer (VGG, conv nets, BN stacks:
:func:`removable_units`, ``removed_units=True`` in its row, with its ``params``
and ``macs``); otherwise (residual streams, a layer left without channels) the
pruned channels' BN scale and shift are kept at zero throughout retraining.
When no ticket is drawn within the budget the search's row says
``ticket_drawn=False`` and there is no ticket row. Both phases resume where
they were cut: the search's checkpoint carries the watch's queue of masks
(:meth:`EarlyBirdWatch.state_dict`), and the ticket starts from the mask,
channels and weights the search wrote at the draw.

Training cost counts 3 forward passes (forward + backward) per example and
step actually taken (the search's t steps dense, then the ticket's T - t, or T
in ``"restart"``), with forward multiply-adds from :func:`ticketlab.metrics.layer_macs`
at the weight mask's per-layer density (the dense search at density 1); a
physically smaller ticket counts its own multiply-adds, while a channel-masked
one does not discount a pruned channel's inputs to the next layer (an upper
bound). The lottery pipeline it is compared with
trains ``levels + 1`` levels (dense level 0 included) for the full budget each,
level l at per-layer density ``(1 - f_layer)^l`` with the spec's per-layer
pruning fractions. ``flops_saved_vs_lottery = 1 - train_flops / lottery``.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..experiment import Experiment, collect_results
from ..masks import Mask, model_density
from ..metrics import forward_flops, layer_macs, multiply_adds, parameter_count
from ..protocols import rewind, snapshot
from ..pruning.structured import BNL1Penalty, bn_layers, groups, remove_units
from ..runs import RESULT_COLUMNS, load_state, read_json, save_state, write_json
from ..spec import Spec
from ..train import evaluate, train

MASK_KINDS = ("channel", "weight")
RETRAIN_FROM = ("draw", "init")
RETRAIN = ("continue", "restart")


@torch.no_grad()
def channel_mask(model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    """Keep-masks over the channels of every BN layer: the ``ratio`` of all channels with
    the smallest |gamma| (one global threshold) are pruned."""
    if not 0.0 < ratio < 1.0:
        raise UsageError(f"pruning ratio must be in (0, 1); got {ratio}")
    bns = bn_layers(model)
    if not bns:
        raise UsageError("early-bird tickets need a model with BatchNorm layers")
    gammas = torch.cat([bn.weight.detach().abs().flatten().cpu() for bn in bns.values()])
    k = int(gammas.numel() * ratio)
    threshold = torch.sort(gammas).values[k] if k < gammas.numel() else float("inf")
    return {n: bn.weight.detach().abs().cpu() >= threshold for n, bn in bns.items()}


def mask_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Normalised Hamming distance: the fraction of channels (or weights) that differ."""
    fa = torch.cat([a[n].flatten() for n in sorted(a)])
    fb = torch.cat([b[n].flatten() for n in sorted(b)])
    return int((fa != fb).sum()) / fa.numel() if fa.numel() else 0.0


class EarlyBirdDetector:
    """FIFO of the last ``keep`` masks; draws when it is full and the newest is within
    ``threshold`` of every other one."""

    def __init__(self, keep: int = 5, threshold: float = 0.1):
        if keep < 2:
            raise UsageError(f"the mask queue must hold >= 2 masks; got {keep}")
        self.keep, self.threshold = keep, threshold
        self.queue: deque = deque(maxlen=keep)
        self.distances: list[float] = []

    def push(self, mask: dict[str, torch.Tensor]) -> bool:
        """Add the newest mask; True when a ticket is drawn."""
        # on the CPU: masks restored from a checkpoint are, and distances compare them all
        self.queue.append({n: m.detach().to("cpu", copy=True) for n, m in mask.items()})
        if len(self.queue) < self.keep:
            self.distances = []
            return False
        newest = self.queue[-1]
        self.distances = [mask_distance(newest, m) for m in list(self.queue)[:-1]]
        return max(self.distances) <= self.threshold

    def state_dict(self) -> dict:
        """The queue (tensors ``queue/<i>/<name>``, oldest first) and the last distances."""
        state: dict = {"distances": list(self.distances), "queued": len(self.queue)}
        for i, mask in enumerate(self.queue):
            state[f"queue_names/{i}"] = list(mask)
            state.update({f"queue/{i}/{n}": m for n, m in mask.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.queue.clear()
        for i in range(state["queued"]):
            self.queue.append({n: state[f"queue/{i}/{n}"] for n in state[f"queue_names/{i}"]})
        self.distances = list(state["distances"])


def expand_channel_mask(model: nn.Module, channels: dict[str, torch.Tensor]) -> Mask:
    """Weight masks of the prunable layers: a conv (or linear) whose outputs feed a BN
    loses the rows of that BN's pruned channels; other layers stay dense.

    The layer feeding a BN is the last Conv/Linear before it in module order.
    """
    prunable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    masks, last = {}, None
    for name, module in model.named_modules():
        if isinstance(module, prunable):
            last = name
            masks[f"{name}.weight"] = torch.ones_like(module.weight, dtype=torch.bool)
        elif name in channels and last is not None:
            w = masks[f"{last}.weight"]
            keep = channels[name].to(w.device)
            if w.shape[0] == keep.numel():
                masks[f"{last}.weight"] = w & keep.view(-1, *([1] * (w.dim() - 1)))
    return Mask(masks)


@torch.no_grad()
def apply_channel_mask(model: nn.Module, channels: dict[str, torch.Tensor]) -> None:
    """Zero the BN scale and shift of pruned channels (their weights go with the Mask)."""
    bns = bn_layers(model)
    for n, keep in channels.items():
        bn = bns[n]
        bn.weight.mul_(keep.to(bn.weight))
        if bn.bias is not None:
            bn.bias.mul_(keep.to(bn.bias))


class EarlyBirdWatch:
    """Training-loop callback: a channel mask after every epoch, the detector on it.

    ``unstructured=True`` uses global weight-magnitude masks of the prunable
    layers instead (same ratio, same queue). ``drawn`` is the epoch of the draw
    (None until then) and ``state`` a copy of the model's state at that point.

    ``state_dict()``/``load_state_dict()`` carry the detector's queue, the history
    and the draw through a training checkpoint, so a resumed search draws the same
    ticket at the same epoch as an uninterrupted one.
    """

    def __init__(
        self,
        steps_per_epoch: int,
        ratio: float,
        keep: int = 5,
        threshold: float = 0.1,
        unstructured: bool = False,
    ):
        self.spe, self.ratio, self.unstructured = steps_per_epoch, ratio, unstructured
        self.detector = EarlyBirdDetector(keep, threshold)
        self.drawn: int | None = None
        self.mask = None
        self.state = None
        self.history: list[dict] = []

    def current_mask(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if not self.unstructured:
            return channel_mask(model, self.ratio)
        from ..pruning.allocation import select

        dense = Mask.dense(model)
        scores = {n: p.detach().abs() for n, p in model.named_parameters() if n in dense}
        return dict(select(scores, dense, 1.0 - self.ratio, "global", model=model).items())

    def after_step(self, step: int, model, optimizer, keeper, x, y) -> None:
        if self.drawn is not None or (step + 1) % self.spe:
            return
        epoch = (step + 1) // self.spe
        mask = self.current_mask(model)
        hit = self.detector.push(mask)
        self.history.append({"epoch": epoch, "distances": list(self.detector.distances)})
        if hit:
            self.drawn, self.mask = epoch, mask
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict:
        state = {f"detector/{k}": v for k, v in self.detector.state_dict().items()}
        state.update(history=self.history, drawn=self.drawn)
        if self.drawn is not None:
            state["mask_names"], state["state_names"] = list(self.mask), list(self.state)
            state.update({f"mask/{n}": m for n, m in self.mask.items()})
            state.update({f"state/{k}": v for k, v in self.state.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(
            {k[len("detector/") :]: v for k, v in state.items() if k.startswith("detector/")}
        )
        self.history = [dict(h) for h in state["history"]]
        self.drawn, self.mask, self.state = state["drawn"], None, None
        if self.drawn is not None:
            self.mask = {n: state[f"mask/{n}"] for n in state["mask_names"]}
            self.state = {k: state[f"state/{k}"] for k in state["state_names"]}


class ChannelKeeper:
    """Training-loop callback: keeps the pruned channels' BN scale and shift at zero."""

    def __init__(self, channels: dict[str, torch.Tensor]):
        self.channels = channels

    def after_step(self, step: int, model, optimizer, keeper, x, y) -> None:
        apply_channel_mask(model, self.channels)


class _Drawn(Exception):
    """Raised from the training loop to end the search at the draw."""


class _StopAtDraw:
    def __init__(self, watch: EarlyBirdWatch):
        self.watch = watch

    def after_step(self, step: int, model, optimizer, keeper, x, y) -> None:
        if self.watch.drawn is not None:
            raise _Drawn


@dataclass(frozen=True)
class EarlyBirdSpec(Spec):
    """Knobs of ``ticketlab early-bird`` on top of :class:`Spec`.

    ``ratio`` is the pruning ratio p; ``l1`` the L1 strength s on the BN scales;
    ``keep`` and ``distance`` the FIFO length and the draw threshold;
    ``retrain_from`` what the ticket's weights start from and ``retrain`` how it is
    retrained: ``continue`` (the rest of the budget, schedule and L1 kept) or
    ``restart`` (the full budget again, schedule restarted, no L1).
    """

    SETUP = (
        "You et al. 2020 (Early-Bird-Tickets README): VGG (the paper's VGG-16; vgg11 here, "
        "lighter on a CPU), SGD 0.1, momentum 0.9, weight decay 1e-4, batch 256, L1 1e-4 on "
        "the BN scales, p = 0.5, FIFO of 5 masks, distance 0.1; its x0.1 at 50% and 75% is "
        "left to --schedule step"
    )

    method: str = "early-bird"
    model: str = "vgg11"
    init: str = "kaiming_normal"
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    ratio: float = 0.5
    l1: float = 1e-4
    retrain_from: str = "draw"
    retrain: str = "continue"
    mask_kind: str = "channel"
    keep: int = 5
    distance: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise UsageError(f"ratio must be in (0, 1); got {r}")
        if isinstance(self.l1, bool) or not isinstance(self.l1, (int, float)) or not self.l1 >= 0:
            raise UsageError(f"l1 must be >= 0; got {self.l1}")
        if self.retrain_from not in RETRAIN_FROM:
            choices = ", ".join(RETRAIN_FROM)
            raise UsageError(f"unknown retrain-from '{self.retrain_from}'; choose from: {choices}")
        if self.retrain not in RETRAIN:
            choices = ", ".join(RETRAIN)
            raise UsageError(f"unknown retrain '{self.retrain}'; choose from: {choices}")
        if self.mask_kind not in MASK_KINDS:
            raise UsageError(
                f"unknown mask kind '{self.mask_kind}'; choose from: {', '.join(MASK_KINDS)}"
            )
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 2:
            raise UsageError(f"keep must be a whole number >= 2; got {self.keep}")
        d = self.distance
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1:
            raise UsageError(f"distance must be in [0, 1]; got {d}")


class EarlyBirdExperiment(Experiment):
    """Early-bird search and retraining bound to ``<runs-dir>/early-bird-<hash12>``."""

    def __init__(self, spec: EarlyBirdSpec, data=None, model_fn=None, model_id=None):
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        probe = self.model_fn(0)
        if spec.mask_kind == "channel" and not bn_layers(probe):
            raise UsageError(f"model '{spec.model}' has no BatchNorm layers for channel masks")
        stored = self.dir / "spec.json"
        if spec.retrain == "continue" and stored.exists():
            if "retrain" not in read_json(stored).get("spec", {}):
                # made before `retrain` existed: its tickets were retrained as "restart"
                raise UsageError(
                    f"run {self.dir} was made before --retrain existed and its tickets were "
                    "retrained with the schedule restarted (now --retrain restart, a run of "
                    "its own); the default is now continue: use another --runs-dir"
                )
        self.macs = layer_macs(probe, self.data.input_shape)

    def _cost(self, steps: int, densities: dict[str, float] | None) -> float:
        return 3.0 * forward_flops(self.macs, densities) * steps * self.spec.batch_size

    def lottery_flops(self) -> float:
        """Training FLOPs of IMP with ``levels`` levels after the dense one, full budget each."""
        return sum(
            self._cost(self.res.steps, {n: (1 - f) ** lv for n, f in self.fractions.items()})
            for lv in range(self.spec.levels + 1)
        )

    def _row(self, r: int, level: int, variant: str, model, mask: Mask, metrics, **extra):
        spec = self.spec
        return {
            "method": spec.method,
            "replicate": r,
            "level": level,
            "variant": variant,
            "density": mask.density(),
            "density_all": model_density(model),
            **metrics,
            "retrain_from": spec.retrain_from,
            "retrain": spec.retrain,
            "mask_kind": spec.mask_kind,
            "ratio": spec.ratio,
            **extra,
            "status": "done",
        }

    def _replicate(self, r: int, levels: int, progress) -> None:
        rdir = self.dir / f"replicate-{r}"
        sdir, tdir = rdir / "level-0" / "search", rdir / "level-1" / "ticket"
        if not (sdir / "result.json").exists():
            # a ticket only follows a finished search: anything of one here is stale
            for stale in ("checkpoint.safetensors", "result.json"):
                (tdir / stale).unlink(missing_ok=True)
            self._search(r, sdir, progress)
        if _drawn(sdir) and not (tdir / "result.json").exists():
            self._ticket(r, sdir, tdir, progress)

    def _search(self, r: int, sdir, progress) -> None:
        """Train the dense network with the L1 penalty and the watch until the draw (or
        the end of the budget). A half-done search resumes from its checkpoint, which
        carries the watch's queue of masks. Writes the search row; at a draw also the
        mask, the channels and the weights at the draw, which the ticket starts from."""
        spec, res = self.spec, self.res
        sdir.mkdir(parents=True, exist_ok=True)
        model = self.model_fn(self.seed(r, "init"))
        dense = Mask.dense(model)
        watch = EarlyBirdWatch(
            self.spe, spec.ratio, spec.keep, spec.distance, spec.mask_kind == "weight"
        )
        callbacks = [BNL1Penalty(spec.l1), watch, _StopAtDraw(watch)]
        try:
            metrics = train(
                model,
                self.data,
                spec,
                dense,
                data_seed=self.seed(r, "data"),
                aug_seed=self.seed(r, "aug"),
                workdir=sdir,
                progress=progress,
                label=f"rep {r} early-bird search",
                callbacks=callbacks,
            )
        except _Drawn:
            metrics = {}
        if watch.drawn is None:
            cost, lottery = self._cost(res.steps, None), self.lottery_flops()
            print(
                f"early-bird: no ticket drawn within {res.steps} steps "
                f"({res.steps // self.spe} epochs) in replicate {r}",
                file=sys.stderr,
            )
            row = self._row(
                r, 0, "search", model, dense, metrics,
                draw_epoch=None, ticket_drawn=False, train_flops=cost,
                lottery_train_flops=lottery, flops_saved_vs_lottery=1 - cost / lottery,
                max_distance=max(watch.detector.distances, default=None),
            )  # fmt: skip
        else:
            search_steps = watch.drawn * self.spe
            if spec.mask_kind == "channel":
                mask = expand_channel_mask(model, watch.mask)
                save_state(sdir / "channels.safetensors", watch.mask)
            else:
                mask = Mask(dict(watch.mask))
            mask.save(sdir / "mask.safetensors")
            save_state(sdir / "weights_draw.safetensors", watch.state)
            row = self._row(
                r, 0, "search", model, dense, {"steps": search_steps},
                draw_epoch=watch.drawn, ticket_drawn=True,
                train_flops=self._cost(search_steps, None),
                max_distance=max(watch.detector.distances),
            )  # fmt: skip
        write_json(sdir / "result.json", row)
        (sdir / "checkpoint.safetensors").unlink(missing_ok=True)
        self.write_results(collect_results(self.dir), RESULT_COLUMNS)

    def _ticket(self, r: int, sdir, tdir, progress) -> None:
        """Retrain the drawn ticket from what the search saved (so a half-done ticket
        resumes from its own checkpoint without searching again): on the rest of the
        budget with the L1 term (``continue``) or on all of it without (``restart``)."""
        spec, res = self.spec, self.res
        search = read_json(sdir / "result.json")
        start = search["steps"] if spec.retrain == "continue" else 0
        model = self.model_fn(self.seed(r, "init"))
        mask = Mask.load(sdir / "mask.safetensors")
        channels = None
        if spec.mask_kind == "channel":
            channels = load_state(sdir / "channels.safetensors")
        if spec.retrain_from == "draw":
            rewind(model, load_state(sdir / "weights_draw.safetensors"), mask)
        else:
            mask.apply_(model)  # the initialisation, as built
        keep = removable_units(model, channels) if channels is not None else None
        removed = {}
        train_mask = mask
        if keep is not None:  # a physically smaller network
            full_weights = mask.num_total()
            model = remove_units(model, keep)
            train_mask = Mask.dense(model)
            channels = None  # nothing left to keep at zero
            removed = {
                "removed_units": True,
                "density": train_mask.num_total() / full_weights,
                "params": parameter_count(model),
                "macs": multiply_adds(model, self.data.input_shape),
            }
        elif channels is not None:
            apply_channel_mask(model, channels)
        tdir.mkdir(parents=True, exist_ok=True)
        mask.save(tdir / "mask.safetensors")
        save_state(tdir / "weights_start.safetensors", snapshot(model))
        callbacks = [BNL1Penalty(spec.l1)] if spec.retrain == "continue" else []
        if channels is not None:
            callbacks.append(ChannelKeeper(channels))
        if start < res.steps:
            metrics = train(
                model,
                self.data,
                spec,
                train_mask,
                start=start,
                data_seed=self.seed(r, "data"),
                aug_seed=self.seed(r, "aug"),
                workdir=tdir,
                progress=progress,
                label=f"rep {r} early-bird ticket ({100 * mask.density():.1f}%)",
                callbacks=callbacks,
            )
        else:  # drawn at the end of the budget: nothing is left to continue with
            metrics = self._untrained(model, start)
        save_state(tdir / "weights_end.safetensors", snapshot(model))
        steps = metrics["steps"]  # the steps the ticket actually took
        if removed:
            retrain = 3.0 * removed["macs"] * steps * spec.batch_size
        else:
            retrain = self._cost(steps, mask.layer_density())
        cost = self._cost(search["steps"], None) + retrain
        lottery = self.lottery_flops()
        row = self._row(
            r, 1, "ticket", model, mask, metrics,
            draw_epoch=search["draw_epoch"], ticket_drawn=True, retrain_start=start,
            train_flops=cost, lottery_train_flops=lottery,
            flops_saved_vs_lottery=1 - cost / lottery, **removed,
        )  # fmt: skip
        write_json(tdir / "result.json", row)
        (tdir / "checkpoint.safetensors").unlink(missing_ok=True)
        self.write_results(collect_results(self.dir), RESULT_COLUMNS)

    def _untrained(self, model, step: int) -> dict:
        """The metrics :func:`~ticketlab.train.train` returns, for a model not trained."""
        data, batch = self.data, self.spec.eval_batch_size
        device = next(model.parameters()).device
        out = {"steps": 0, "train_seconds": 0.0, "best_val_step": step}
        for split in ("test", "val", "train"):
            x, y = getattr(data, f"x_{split}").to(device), getattr(data, f"y_{split}").to(device)
            out[f"{split}_loss"], out[f"{split}_accuracy"] = evaluate(model, x, y, batch)
        out["test_accuracy_at_best_val"] = out["test_accuracy"]
        return out


def removable_units(model: nn.Module, channels: dict[str, torch.Tensor]):
    """The unit masks of :func:`~ticketlab.pruning.structured.remove_units` equivalent to
    a channel mask over BatchNorm layers, or None when the channels cannot be removed
    one layer at a time (residual streams, a layer left without channels, a model the
    structured path does not know)."""
    try:
        gs = groups(model)
    except UsageError:
        return None
    keep, covered = {}, set()
    for g in gs:
        if len(g.norms) == 1 and g.norms[0] in channels:
            keep[g.key] = channels[g.norms[0]].detach().cpu().bool()
            covered.add(g.norms[0])
    if covered != set(channels) or not all(bool(m.any()) for m in keep.values()):
        return None
    return keep


def _drawn(sdir) -> bool:
    return bool(read_json(sdir / "result.json").get("ticket_drawn"))


__all__ = [
    "BNL1Penalty",
    "ChannelKeeper",
    "EarlyBirdExperiment",
    "EarlyBirdSpec",
    "EarlyBirdDetector",
    "EarlyBirdWatch",
    "apply_channel_mask",
    "channel_mask",
    "expand_channel_mask",
    "mask_distance",
]
