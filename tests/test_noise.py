"""k-winners inside the model registry, and ``ticketlab noise`` end to end."""

import csv

import pytest
import torch
from torch import nn

import ticketlab.experiment as experiment_mod
from ticketlab.cli import main
from ticketlab.data import from_tensors
from ticketlab.models import build
from ticketlab.models.kwinners import BoostDecay, KWinners, kwinners_factory


@pytest.mark.parametrize(
    "name, shape",
    [("mlp_20_10", (1, 6, 6)), ("conv2", (1, 8, 8)), ("vgg11", (1, 8, 8)), ("resnet20", (1, 8, 8))],
)
def test_activation_factory_keeps_names_and_weights(name, shape):
    plain = build(name, shape, 3, 0.25, seed=4)
    kw = build(name, shape, 3, 0.25, seed=4, activation=kwinners_factory(0.25, 1.5))
    assert dict(plain.named_parameters()).keys() == dict(kw.named_parameters()).keys()
    for (_, a), (_, b) in zip(plain.named_parameters(), kw.named_parameters()):
        assert torch.equal(a, b)
    layers = [m for m in kw.modules() if isinstance(m, KWinners)]
    assert layers and not any(isinstance(m, KWinners) for m in plain.modules())
    kw.eval()
    assert kw(torch.randn(2, *shape)).shape == (2, 3)
    for m in layers:
        assert m.k == max(1, round(0.25 * m.n)) and m.k_inference == min(m.n, round(1.5 * m.k))


def test_activation_gets_layer_output_shapes():
    seen = []

    def factory(shape):
        seen.append(shape)
        return nn.ReLU()

    build("conv2", (1, 8, 8), 3, 0.25, activation=factory)
    assert seen == [(16, 8, 8), (16, 8, 8), (64,), (64,)]
    seen.clear()
    build("resnet20", (1, 7, 9), 3, 0.25, activation=factory)  # odd sizes: 7x9, 4x5, 2x3
    stages = [(4, 7, 9)] * 6 + [(8, 4, 5)] * 6 + [(16, 2, 3)] * 6
    assert seen == [(4, 7, 9), *stages]  # the stem's, then two per block


class _OldBlock(nn.Module):
    """The ResNet block as it was before activations were pluggable (reference)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class _OldResNet(nn.Module):
    def __init__(self, input_shape, num_classes, n, widths):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, c = [], widths[0]
        for stage, f in enumerate(widths):
            for i in range(n):
                blocks.append(_OldBlock(c, f, stride=2 if stage > 0 and i == 0 else 1))
                c = f
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.blocks(self.bn(self.conv(x)).relu())
        return self.fc(self.pool(x).flatten(1))


def test_resnet_without_activation_is_unchanged():
    from ticketlab.models import initialize

    new = build("resnet20", (3, 8, 8), 10, 0.5, seed=3)
    old = _OldResNet((3, 8, 8), 10, 3, [8, 16, 32])
    initialize(old, "kaiming_normal", torch.Generator().manual_seed(3))
    a, b = old.state_dict(), new.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(old(x), new(x))
    assert not any(isinstance(m, nn.ReLU) for m in new.modules())  # functional ReLUs as before


def test_kwinners_keep_exactly_k_per_sample_in_a_resnet():
    model = build("resnet20", (3, 8, 8), 10, 0.5, seed=1, activation=kwinners_factory(0.1, 1.5))
    layers = [m for m in model.modules() if isinstance(m, KWinners)]
    assert len(layers) == 19  # the stem and two per block of 3 x 3 blocks
    counts = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: counts.append((m, (o != 0).flatten(1).sum(1))))
        for m in layers
    ]
    model.train()
    model(torch.randn(5, 3, 8, 8)).sum().backward()
    for h in hooks:
        h.remove()
    assert len(counts) == 19
    for m, c in counts:
        assert m.k == max(1, round(0.1 * m.n)) and (c == m.k).all()
    assert all(bool(m.seen == 5) for m in layers)  # duty cycles updated in training mode


def test_boost_decays_per_epoch():
    model = build("mlp_8", (4,), 2, activation=kwinners_factory(0.5, 1.0, beta=2.0))
    BoostDecay().on_epoch_end(1, model)
    (kw,) = [m for m in model.modules() if isinstance(m, KWinners)]
    assert kw.beta == pytest.approx(1.8)


@pytest.fixture
def tiny(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long()
    data = from_tensors(x[:256], y[:256], x[256:], y[256:], val_size=32, name="tiny")
    monkeypatch.setattr(experiment_mod, "load_data", lambda *a, **k: data)
    return data


BASE = ["noise", "--model", "conv2", "--width", "0.25", "--batch-size", "32", "--quiet"]


def test_noise_command(tiny, tmp_path):
    args = [*BASE, "--steps", "2ep", "--eval-every", "1ep", "--density", "0.3"]
    assert main([*args, "--noise", "0,0.4,0.8", "--runs-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("noise-*/results.csv")
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0])[:5] == ["method", "replicate", "level", "variant", "noise"]
    got = {(r["variant"], float(r["noise"])) for r in rows}
    assert got == {(v, s) for v in ("dense", "sparse", "sparse-kwinners") for s in (0, 0.4, 0.8)}
    for r in rows:
        assert 0 <= float(r["test_accuracy"]) <= 1
        if float(r["noise"]) == 0:  # clean evaluation matches the training loop's own
            assert float(r["test_accuracy"]) == pytest.approx(float(r["clean_test_accuracy"]))
    dens = {r["variant"]: float(r["density"]) for r in rows}
    assert dens["dense"] == 1 and abs(dens["sparse"] - 0.3) < 0.02
    assert dens["sparse"] == dens["sparse-kwinners"]
    # the report draws the curves and tabulates the very numbers of results.csv
    from ticketlab.report import build_report, load_runs, noise_section

    build_report([path.parent], tmp_path / "report")
    assert (tmp_path / "report" / "noise.png").stat().st_size > 0
    (table,) = noise_section(load_runs([path.parent]), tmp_path / "again").tables
    acc = {(r["variant"], float(r["noise"])): 100 * float(r["test_accuracy"]) for r in rows}
    assert len(table.rows) == len(acc)
    for variant, scale, n, mean, std in table.rows:  # one replicate: std 0
        assert n == "1" and float(mean) == pytest.approx(acc[(variant, float(scale))], abs=0.01)
        assert float(std) == 0


def test_noise_bad_input(tiny, tmp_path):
    base = [*BASE, "--runs-dir", str(tmp_path)]
    assert main([*base, "--noise", "0,a"]) == 2
    assert main([*base, "--noise", "-0.1"]) == 2
    assert main([*base, "--density", "1"]) == 2
    assert main([*base, "--kwinners", "1.5"]) == 2
    assert main([*base, "--kwinners-inference", "0.5"]) == 2
    assert main([*base, "--noise", "0,1.5"]) == 2  # a fraction of the pixels
    assert main([*base, "--noise-kind", "salt"]) == 2
    assert main([*base, "--weight-sparsity", "per-row"]) == 2
    assert main([*base, "--duty-cycles", "column"]) == 2
    assert not list(tmp_path.iterdir())


def test_noise_command_with_resnet(tiny, tmp_path):
    args = ["noise", "--model", "resnet20", "--width", "0.25", "--batch-size", "64", "--quiet"]
    args += ["--steps", "1ep", "--eval-every", "1ep", "--noise", "0,0.5"]
    assert main([*args, "--runs-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("noise-*/results.csv")
    rows = list(csv.DictReader(path.open()))
    assert {r["variant"] for r in rows} == {"dense", "sparse", "sparse-kwinners"}
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    (kw,) = tmp_path.glob("noise-*/replicate-0/level-1/sparse-kwinners/weights_end.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(kw))
    assert sum(k.endswith(".duty") for k in state) == 19  # the k-winners layers trained


def _interrupting(module, monkeypatch, when):
    """Wrap ``module.train`` so that the first call whose label contains ``when[0]`` is
    interrupted (checkpoint, RunInterrupted) after ``when[1]`` steps; returns the first
    step of every call, by label."""
    from ticketlab.train import request_stop

    real, starts, fired = module.train, [], []

    class Stop:
        def __init__(self, label):
            self.label, self.first = label, None

        def after_step(self, step, *args):
            if self.first is None:
                self.first = step
                starts.append((self.label, step))
            if when[0] in self.label and step + 1 == when[1] and not fired:
                fired.append(step)
                request_stop()

    def train(*args, callbacks=(), label="", **kw):
        return real(*args, callbacks=[*callbacks, Stop(label)], label=label, **kw)

    monkeypatch.setattr(module, "train", train)
    return starts


def _same_results(a_dir, b_dir):
    """The same files of weights and masks, bit for bit, and the same result rows."""
    import json

    from safetensors.torch import load_file

    names = sorted(p.relative_to(a_dir) for p in a_dir.rglob("*.safetensors"))
    assert names == sorted(p.relative_to(b_dir) for p in b_dir.rglob("*.safetensors"))
    assert any(n.name == "weights_end.safetensors" for n in names)
    for n in names:
        a, b = load_file(str(a_dir / n)), load_file(str(b_dir / n))
        assert a.keys() == b.keys(), n
        for k in a:
            assert torch.equal(a[k], b[k]), (n, k)
    results = sorted(p.relative_to(a_dir) for p in a_dir.rglob("result.json"))
    assert results == sorted(p.relative_to(b_dir) for p in b_dir.rglob("result.json"))
    for n in results:
        ra, rb = (json.loads((d / n).read_text()) for d in (a_dir, b_dir))
        ra.pop("train_seconds", None), rb.pop("train_seconds", None)
        assert ra == rb, n


def test_noise_resume_is_bit_identical(tiny, tmp_path, monkeypatch):
    from ticketlab.errors import RunInterrupted
    from ticketlab.methods import noise

    def spec(where):
        return noise.NoiseSpec(
            model="conv2", width=0.25, batch_size=32, steps="3ep", eval_every="2ep",
            density=0.3, noise=(0.0, 0.4), quiet=True, runs_dir=str(tmp_path / where),
        )  # fmt: skip

    noise.NoiseExperiment(spec("whole")).run()
    # 7 steps an epoch: step 10 is after one boost decay and between evaluations
    starts = _interrupting(noise, monkeypatch, ("kwinners", 10))
    with pytest.raises(RunInterrupted):
        noise.NoiseExperiment(spec("split")).run()
    noise.NoiseExperiment(spec("split")).run()
    assert [s for label, s in starts if "kwinners" in label] == [0, 10]  # resumed, not redone
    (whole,), (split,) = (list((tmp_path / d).glob("noise-*")) for d in ("whole", "split"))
    _same_results(whole, split)
    assert not list(split.rglob("checkpoint.safetensors"))


def _per_unit_counts(m: torch.Tensor) -> torch.Tensor:
    """Kept inputs of each output unit (a conv's output channel: over in x kh x kw)."""
    return m.flatten(1).sum(1)


def test_sparse_networks_keep_the_same_count_per_unit(tiny, tmp_path):
    """The paper's sparse weights: every unit of a layer has the same number of nonzero
    inputs, fan_in - round((1 - d) fan_in), at one density d for all layers."""
    from ticketlab.masks import Mask

    args = [*BASE, "--steps", "1it", "--eval-every", "1it", "--density", "0.3"]
    assert main([*args, "--noise", "0", "--runs-dir", str(tmp_path)]) == 0
    (run,) = tmp_path.glob("noise-*")
    masks = [Mask.load(run / f"replicate-0/level-1/{v}/mask.safetensors") for v in
             ("sparse", "sparse-kwinners")]  # fmt: skip
    assert masks[0] == masks[1]
    assert len(masks[0]) == 5  # conv2: two convs, two hidden linears, the output
    for name, m in masks[0].items():
        fan_in = m[0].numel()
        want = fan_in - round(0.7 * fan_in)
        assert (_per_unit_counts(m) == want).all(), name


def test_fixed_fan_in_mask_with_a_distribution():
    from ticketlab.pruning.allocation import fixed_fan_in_mask, layer_densities

    model = build("conv2", (1, 8, 8), 3, 0.25, seed=0)
    g = torch.Generator().manual_seed(1)
    mask = fixed_fan_in_mask(model, 0.2, "erk", generator=g)
    dens = layer_densities(model, 0.2, "erk")
    for name, m in mask.items():
        fan_in = m[0].numel()
        assert (_per_unit_counts(m) == max(1, fan_in - round((1 - dens[name]) * fan_in))).all()
    assert abs(mask.density() - 0.2) < 0.01
    first = fixed_fan_in_mask(model, 0.2, "uniform", first_dense=True, generator=g)
    assert first[first.names()[0]].all()
    # one generator draw per layer: the same seed gives the same mask
    a = fixed_fan_in_mask(model, 0.5, generator=torch.Generator().manual_seed(7))
    b = fixed_fan_in_mask(model, 0.5, generator=torch.Generator().manual_seed(7))
    assert a == b


def test_noise_defaults_are_the_papers_and_old_ones_are_options(tiny, tmp_path):
    from ticketlab.methods.noise import NoiseSpec
    from ticketlab.pruning.allocation import random_sparse_mask

    spec = NoiseSpec()
    assert spec.noise_kind == "pixels" and spec.weight_sparsity == "per-unit"
    assert spec.distribution == "uniform" and spec.duty_cycles == "channel"
    assert spec.noise == pytest.approx(tuple(i / 20 for i in range(11)))
    # the earlier behaviour: ERK random masks, Gaussian noise, per-unit duty cycles
    args = [*BASE, "--steps", "1it", "--eval-every", "1it", "--density", "0.3"]
    args += ["--noise-kind", "gaussian", "--weight-sparsity", "per-layer"]
    args += ["--distribution", "erk", "--duty-cycles", "unit", "--noise", "0,2"]
    assert main([*args, "--runs-dir", str(tmp_path)]) == 0
    (run,) = tmp_path.glob("noise-*")
    from ticketlab.masks import Mask
    from ticketlab.methods.noise import NoiseExperiment

    spec = NoiseSpec(
        model="conv2", width=0.25, batch_size=32, steps="1it", eval_every="1it", density=0.3,
        noise_kind="gaussian", weight_sparsity="per-layer", distribution="erk",
        duty_cycles="unit", noise=(0.0, 2.0), quiet=True, runs_dir=str(tmp_path),
    )  # fmt: skip
    exp = NoiseExperiment(spec)
    assert exp.dir == run
    gen = torch.Generator().manual_seed(exp.seed(0, "noise/mask"))
    old = random_sparse_mask(exp.model_fn(exp.seed(0, "init")), 0.3, "erk", False, gen)
    assert Mask.load(run / "replicate-0/level-1/sparse/mask.safetensors") == old
    from safetensors.torch import load_file

    state = load_file(str(run / "replicate-0/level-1/sparse-kwinners/weights_end.safetensors"))
    duty = {k: v.shape for k, v in state.items() if k.endswith(".duty")}
    assert sorted(duty.values()) == [(64,), (64,), (16 * 8 * 8,), (16 * 8 * 8,)]


def test_a_run_from_before_the_paper_defaults_is_refused(tiny, tmp_path):
    """A default spec keeps its hash, so a run directory written before noise_kind,
    weight_sparsity and duty_cycles existed (Gaussian, per-layer, per-unit) is refused
    instead of being taken for the paper's setup."""
    from ticketlab.errors import UsageError
    from ticketlab.methods.noise import NoiseExperiment, NoiseSpec
    from ticketlab.runs import write_spec
    from ticketlab.spec import resolved_dict

    spec = NoiseSpec(model="conv2", width=0.25, quiet=True, runs_dir=str(tmp_path))
    exp = NoiseExperiment(spec)
    old = resolved_dict(spec, exp.spe)
    for k in ("noise_kind", "weight_sparsity", "duty_cycles"):
        old.pop(k)
    exp.dir.mkdir(parents=True)
    write_spec(exp.dir, exp.identity, exp.hash, old, exp.spe)
    with pytest.raises(UsageError, match="another --runs-dir"):
        NoiseExperiment(spec)
    write_spec(exp.dir, exp.identity, exp.hash, resolved_dict(spec, exp.spe), exp.spe)
    assert NoiseExperiment(spec).dir == exp.dir  # a run with the knobs is fine
