"""Noise robustness of sparse weights and k-winners activations (Ahmad & Scheinkman 2019).

Per replicate, three networks of the same initialisation train on the same
budget and data order: ``dense``; ``sparse``, a static random weight mask at
``density`` (spread over layers by ``distribution``, as in ``ticketlab dst``);
and ``sparse-kwinners``, the same mask with every hidden ReLU replaced by a
k-winners layer keeping the fraction ``kwinners`` of its units (``kwinners_inference``
times as many at evaluation), boosted with strength ``boost_strength`` decayed
by ``boost_decay`` after every epoch. Each is then evaluated on the test set
with Gaussian noise of each scale in ``noise`` (times the test inputs' std):
results.csv has one row per network and noise scale (key column ``noise``):
``test_accuracy`` is the accuracy at that scale, ``clean_test_accuracy`` the
one without noise; the other metrics (losses, val) are the clean ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..experiment import Experiment, collect_results
from ..masks import Mask, model_density
from ..models import build
from ..models.kwinners import BoostDecay, kwinners_factory, noise_robustness
from ..protocols import rewind, snapshot
from ..pruning.allocation import DISTRIBUTIONS, random_sparse_mask
from ..runs import RESULT_COLUMNS, save_state, write_csv, write_json
from ..spec import Spec
from ..train import train

VARIANTS = ("dense", "sparse", "sparse-kwinners")


@dataclass(frozen=True)
class NoiseSpec(Spec):
    """Knobs of ``ticketlab noise`` on top of :class:`Spec`.

    ``kwinners`` is the fraction k/n of units kept per layer (None: no k-winners
    network); ``kwinners_inference`` the factor on k at evaluation.
    """

    method: str = "noise"
    density: float = 0.5
    distribution: str = "erk"
    kwinners: float | None = 0.25
    kwinners_inference: float = 1.5
    boost_strength: float = 1.5
    boost_decay: float = 0.9
    noise: tuple[float, ...] = (0.0, 0.1, 0.2, 0.4, 0.8)

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
        object.__setattr__(self, "noise", scales)

    def activation(self):
        """The k-winners activation factory of this spec (None without k-winners)."""
        if self.kwinners is None:
            return None
        return kwinners_factory(
            self.kwinners, self.kwinners_inference, self.boost_strength, self.boost_decay
        )


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
        if spec.kwinners is not None:
            self.kw_model(0)  # a model without hidden ReLUs to replace fails here

    def kw_model(self, seed: int):
        s = self.spec
        shape, classes = self.data.input_shape, self.data.num_classes
        return build(s.model, shape, classes, s.width, s.init, seed, activation=s.activation())

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
                    mask = random_sparse_mask(model, spec.density, spec.distribution, False, gen)
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
            acc = noise_robustness(model, x, y, spec.noise, seed=self.seed(r, "noise/eval"))
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
                "status": "done",
            }
            write_json(vdir / "result.json", row)
            (vdir / "checkpoint.safetensors").unlink(missing_ok=True)
            write_csv(self.dir / "results.csv", expand(collect_results(self.dir)), COLUMNS)


COLUMNS = [*RESULT_COLUMNS[:4], "noise", *RESULT_COLUMNS[4:]]


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
