"""Noise robustness of sparse weights and k-winners activations (Ahmad & Scheinkman 2019).

Per replicate, three networks of the same initialisation train on the same
budget and data order: ``dense``; ``sparse``, a static random weight mask at
``density``; and ``sparse-kwinners``, the same mask with every hidden ReLU
replaced by a k-winners layer keeping the fraction ``kwinners`` of its units
(``kwinners_inference`` times as many at evaluation), boosted with strength
``boost_strength`` decayed by ``boost_decay`` after every epoch. Each is then
evaluated on the test set at each noise level in ``noise``: results.csv has one
row per network and noise level (key column ``noise``): ``test_accuracy`` is
the accuracy at that level, ``clean_test_accuracy`` the one without noise; the
other metrics (losses, val) are the clean ones.

The defaults are the paper's choices (and its reference code's):

- ``noise_kind="pixels"``: a level eta in ``noise`` (0, 0.05, ..., 0.5) sets
  int(eta x size) of each test example's input values, drawn at random, to a
  fixed bright value, the training inputs' mean + 2 std per channel (2 after
  normalisation). ``gaussian`` instead adds Gaussian noise of scale eta times
  the test inputs' std.
- ``weight_sparsity="per-unit"``: every output unit (a conv's output channel)
  of a layer keeps the same number of inputs, fan_in - round((1 - d) fan_in),
  with one density d for all layers (``distribution="uniform"``). ``per-layer``
  instead keeps round(d_i n_i) weights anywhere in each layer, as ``ticketlab
  dst`` does; ``distribution`` (uniform, er, erk) spreads ``density`` over the
  layers in both cases.
- ``duty_cycles="channel"``: a conv layer's k-winners count duty cycles and
  boost per channel; ``unit`` per C x H x W unit.

The earlier defaults are ``noise_kind="gaussian"``, ``weight_sparsity="per-layer"``,
``distribution="erk"``, ``duty_cycles="unit"`` and ``noise=(0, 0.1, 0.2, 0.4, 0.8)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..experiment import Experiment, collect_results
from ..masks import Mask, model_density
from ..models import build
from ..models.kwinners import (
    DUTY_CYCLES,
    NOISE_KINDS,
    PAPER_NOISE_LEVELS,
    BoostDecay,
    bright_value,
    kwinners_factory,
    noise_robustness,
)
from ..protocols import rewind, snapshot
from ..pruning.allocation import DISTRIBUTIONS, fixed_fan_in_mask, random_sparse_mask
from ..runs import RESULT_COLUMNS, read_json, save_state, write_json
from ..spec import Spec
from ..train import train

VARIANTS = ("dense", "sparse", "sparse-kwinners")
WEIGHT_SPARSITY = ("per-unit", "per-layer")
# what a run stored before these knobs existed did (its spec.json lacks them)
EARLIER = {"noise_kind": "gaussian", "weight_sparsity": "per-layer", "duty_cycles": "unit"}


@dataclass(frozen=True)
class NoiseSpec(Spec):
    """Knobs of ``ticketlab noise`` on top of :class:`Spec`.

    ``kwinners`` is the fraction k/n of units kept per layer (None: no k-winners
    network); ``kwinners_inference`` the factor on k at evaluation. ``noise_kind``,
    ``weight_sparsity`` and ``duty_cycles`` default to the paper's choices (see the
    module): the run of a default spec is not the one it was before these knobs.
    """

    SETUP = (
        "Ahmad & Scheinkman 2019 (htmpapers how_can_we_be_so_dense): a fraction 0, 0.05, ..., "
        "0.5 of test pixels set to mean + 2 std, every unit with the same number of inputs, "
        "k-winners 25% with duty cycles per conv channel, boost 1.5 x 0.9 per epoch; "
        "training as the lottery's (Frankle & Carbin LeNet: Adam 1.2e-3, batch 60)"
    )

    method: str = "noise"
    density: float = 0.5
    distribution: str = "uniform"
    weight_sparsity: str = "per-unit"
    kwinners: float | None = 0.25
    kwinners_inference: float = 1.5
    boost_strength: float = 1.5
    boost_decay: float = 0.9
    duty_cycles: str = "channel"
    noise_kind: str = "pixels"
    noise: tuple[float, ...] = PAPER_NOISE_LEVELS

    def __post_init__(self) -> None:
        super().__post_init__()
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < 1:
            raise UsageError(f"density must be in (0, 1); got {d}")
        if self.distribution not in DISTRIBUTIONS:
            raise UsageError(
                f"unknown distribution '{self.distribution}'; "
                f"choose from: {', '.join(DISTRIBUTIONS)}"
            )
        for name, choices in (
            ("weight_sparsity", WEIGHT_SPARSITY),
            ("duty_cycles", DUTY_CYCLES),
            ("noise_kind", NOISE_KINDS),
        ):
            if getattr(self, name) not in choices:
                raise UsageError(
                    f"unknown {name.replace('_', ' ')} '{getattr(self, name)}'; "
                    f"choose from: {', '.join(choices)}"
                )
        if self.kwinners is not None:
            kwinners_factory(self.kwinners, self.kwinners_inference)  # validates
        if not (isinstance(self.boost_strength, (int, float)) and self.boost_strength >= 0):
            raise UsageError(f"boost strength must be >= 0; got {self.boost_strength}")
        if not (isinstance(self.boost_decay, (int, float)) and 0 <= self.boost_decay <= 1):
            raise UsageError(f"boost decay must be in [0, 1]; got {self.boost_decay}")
        try:
            scales = tuple(float(s) for s in self.noise)
        except (TypeError, ValueError):
            raise UsageError(f"noise scales must be numbers; got {self.noise!r}") from None
        if not scales or min(scales) < 0:
            raise UsageError(f"noise scales must be >= 0 and at least one; got {self.noise!r}")
        if self.noise_kind == "pixels" and max(scales) > 1:
            raise UsageError(
                f"pixel-noise levels are fractions of the pixels, in [0, 1]; got {self.noise!r}"
            )
        object.__setattr__(self, "noise", scales)

    def activation(self):
        """The k-winners activation factory of this spec (None without k-winners)."""
        if self.kwinners is None:
            return None
        return kwinners_factory(
            self.kwinners,
            self.kwinners_inference,
            self.boost_strength,
            self.boost_decay,
            duty_cycles=self.duty_cycles,
        )

    def sparse_mask(self, model, generator: torch.Generator) -> Mask:
        """The static random mask of the sparse networks (see ``weight_sparsity``)."""
        if self.weight_sparsity == "per-unit":
            return fixed_fan_in_mask(model, self.density, self.distribution, False, generator)
        return random_sparse_mask(model, self.density, self.distribution, False, generator)


def parse_scales(text: str) -> tuple[float, ...]:
    """``"0,0.1,0.2"`` -> (0.0, 0.1, 0.2); a UsageError on anything else."""
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--noise expects comma-separated numbers; got {text!r}") from None


class NoiseExperiment(Experiment):
    """Dense vs sparse vs sparse + k-winners under input noise: ``<runs-dir>/noise-<hash12>``."""

    def __init__(self, spec: NoiseSpec, data=None, model_fn=None, model_id=None):
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        self._refuse_earlier_run()
        if spec.kwinners is not None:
            self.kw_model(0)  # a model without hidden ReLUs to replace fails here

    def _refuse_earlier_run(self) -> None:
        """A run directory from before ``noise_kind``, ``weight_sparsity`` and
        ``duty_cycles`` existed can have this spec's hash (their defaults are left out of
        it) but holds the earlier behaviour: refuse it unless the spec asks for that."""
        path = self.dir / "spec.json"
        if not path.exists():
            return
        stored = read_json(path).get("spec", {})
        if any(k in stored for k in EARLIER):
            return
        now = {k: getattr(self.spec, k) for k in EARLIER}
        if now != EARLIER:
            raise UsageError(
                f"run {self.dir} was made before --noise-kind, --weight-sparsity and "
                "--duty-cycles existed, so with Gaussian noise, per-layer masks and per-unit "
                "duty cycles; use another --runs-dir (or those options)"
            )

    def kw_model(self, seed: int):
        s = self.spec
        shape, classes = self.data.input_shape, self.data.num_classes
        model = build(s.model, shape, classes, s.width, s.init, seed, activation=s.activation())
        return model.to(self.device)

    def variants(self) -> tuple[str, ...]:
        return VARIANTS if self.spec.kwinners is not None else VARIANTS[:2]

    def run(self, progress=None) -> list[dict]:
        super().run(progress)
        return expand(collect_results(self.dir))

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec = self.spec
        seed = self.seed(r, "init")
        mask = None
        for variant in self.variants():
            level = 0 if variant == "dense" else 1
            vdir = self.dir / f"replicate-{r}" / f"level-{level}" / variant
            model = self.kw_model(seed) if variant == "sparse-kwinners" else self.model_fn(seed)
            if variant == "dense":
                vmask = Mask.dense(model)
            else:
                if mask is None:
                    gen = torch.Generator().manual_seed(self.seed(r, "noise/mask"))
                    mask = spec.sparse_mask(model, gen)
                vmask = mask
            if (vdir / "result.json").exists():
                continue
            vdir.mkdir(parents=True, exist_ok=True)
            # a half-done variant resumes from its checkpoint: the k-winners duty cycles
            # and boost strength are buffers, in the model state it holds
            vmask.save(vdir / "mask.safetensors")
            rewind(model, snapshot(model), vmask)
            save_state(vdir / "weights_start.safetensors", snapshot(model))
            metrics = train(
                model,
                self.data,
                spec,
                vmask,
                data_seed=self.seed(r, "data"),
                aug_seed=self.seed(r, "aug"),
                workdir=vdir,
                progress=progress,
                label=f"rep {r} {variant} ({100 * vmask.density():.1f}%)",
                callbacks=[BoostDecay()] if variant == "sparse-kwinners" else [],
            )
            save_state(vdir / "weights_end.safetensors", snapshot(model))
            x, y = self.data.x_test, self.data.y_test
            # the paper's bright value comes from the training inputs' statistics
            value = bright_value(self.data.x_train) if spec.noise_kind == "pixels" else None
            acc = noise_robustness(
                model, x, y, spec.noise, self.seed(r, "noise/eval"), spec.noise_kind, value
            )
            row = {
                "method": spec.method,
                "replicate": r,
                "level": level,
                "variant": variant,
                "density": vmask.density(),
                "density_all": model_density(model),
                **metrics,
                "kwinners": spec.kwinners if variant == "sparse-kwinners" else None,
                "noise_accuracy": {str(k): v for k, v in acc.items()},
                "noise_kind": spec.noise_kind,
                "status": "done",
            }
            write_json(vdir / "result.json", row)
            (vdir / "checkpoint.safetensors").unlink(missing_ok=True)
            self.write_results(expand(collect_results(self.dir)), COLUMNS)


COLUMNS = [*RESULT_COLUMNS[:4], "noise", "noise_kind", *RESULT_COLUMNS[4:]]


def expand(rows: list[dict]) -> list[dict]:
    """One row per network and noise scale; ``test_accuracy`` is the accuracy at that scale."""
    out = []
    for row in rows:
        accs = row.get("noise_accuracy") or {}
        base = {k: v for k, v in row.items() if k != "noise_accuracy"}
        for scale, acc in sorted(accs.items(), key=lambda kv: float(kv[0])):
            out.append(
                {**base, "noise": float(scale), "test_accuracy": acc,
                 "clean_test_accuracy": row.get("test_accuracy")}
            )  # fmt: skip
    return out


__all__ = ["NoiseExperiment", "NoiseSpec", "expand", "parse_scales"]
