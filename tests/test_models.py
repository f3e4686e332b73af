import math

import pytest
import torch
from torch import nn

from ticketlab.errors import UsageError
from ticketlab.models import (
    INITS,
    MODELS,
    build,
    check,
    describe_models,
    initialize,
    layer_init_std,
)

NAMES = [*MODELS, "mlp_500_500", "mlp_100"]
SHAPES = [(3, 32, 32), (1, 28, 28)]


def weight_count(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("shape", SHAPES, ids=["cifar", "mnist"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name, shape):
    model = build(name, shape, 10)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.model_name == name
    # The output layer is the last Linear, and is named so.
    assert model.output_layer_name == linears(model)[-1][0]


@pytest.mark.parametrize(
    "name,shape,weights",
    [
        ("lenet_300_100", (1, 28, 28), 266_200),
        ("conv2", (3, 32, 32), 4_300_992),
        ("conv4", (3, 32, 32), 2_425_024),
        ("conv6", (3, 32, 32), 2_261_184),
    ],
)
def test_weight_counts_match_frankle_carbin(name, shape, weights):
    assert weight_count(build(name, shape, 10)) == weights


def test_resnet20_size_and_describe():
    assert 0.26e6 < sum(p.numel() for p in build("resnet20", (3, 32, 32), 10).parameters()) < 0.28e6
    rows = {r["name"]: r for r in describe_models()}
    assert rows["conv2"]["weights"] == 4_300_992
    assert rows["lenet_300_100"]["weights"] == 266_200
    assert set(MODELS) < set(rows)


def test_mlp_on_vectors_and_hidden_widths():
    model = build("mlp_500_500", (1, 40), 10)
    assert [m.out_features for _, m in linears(model)] == [500, 500, 10]
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)
    assert build("mlp_100", (2,), 2)(torch.randn(3, 2)).shape == (3, 2)


def test_conv_needs_image_input():
    with pytest.raises(
        UsageError, match=r"model 'conv2' needs image input \(C,H,W\); dataset gives \(1, 40\)"
    ):
        build("conv2", (1, 40), 10)


def test_width_halves_channels():
    lenet = build("lenet_300_100", (1, 28, 28), 10, width=0.5)
    assert [m.out_features for _, m in linears(lenet)] == [150, 50, 10]
    conv = build("conv4", (3, 32, 32), 10, width=0.5)
    convs = [m.out_channels for m in conv.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 32, 64, 64]
    assert [m.out_features for _, m in linears(conv)] == [128, 128, 10]
    assert build("resnet20", (3, 32, 32), 10, width=0.5).fc.in_features == 32
    assert build("vgg11", (3, 32, 32), 10, width=0.5).fc.in_features == 256
    with pytest.raises(UsageError, match="width"):
        build("conv2", (3, 32, 32), 10, width=0)


@pytest.mark.parametrize("name", ["lenet_300_100", "resnet20", "vgg11"])
def test_same_seed_bit_identical_other_seed_differs(name):
    a = build(name, (3, 32, 32), 10, seed=3).state_dict()
    b = build(name, (3, 32, 32), 10, seed=3).state_dict()
    c = build(name, (3, 32, 32), 10, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert all(not torch.equal(a[k], c[k]) for k in weights)


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build("conv2", (3, 32, 32), 10, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("init", [*INITS, "glorot_normal"])
def test_empirical_std(init):
    layer = nn.Linear(1000, 500)
    initialize(layer, init, torch.Generator().manual_seed(0))
    fan_in, fan_out = 1000, 500
    expected = math.sqrt(2 / fan_in) if "kaiming" in init else math.sqrt(2 / (fan_in + fan_out))
    assert layer_init_std(layer.weight, init) == pytest.approx(expected)
    assert layer.weight.std().item() == pytest.approx(expected, rel=0.01)
    assert layer.weight.mean().abs().item() < 0.01 * expected
    assert torch.count_nonzero(layer.bias) == 0
    if "uniform" in init:
        assert layer.weight.abs().max().item() <= math.sqrt(3) * expected


def test_layer_init_std_conv_fan():
    w = torch.empty(64, 16, 3, 3)
    assert layer_init_std(w, "kaiming_normal") == pytest.approx(math.sqrt(2 / (16 * 9)))
    assert layer_init_std(w, "xavier_uniform") == pytest.approx(math.sqrt(2 / (16 * 9 + 64 * 9)))


def test_initialize_user_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3)
            self.bn = nn.BatchNorm1d(4)
            self.head = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.full((1,), 7.0))

    net = Net()
    net.bn.weight.data.fill_(5.0)
    net.bn.running_mean.fill_(2.0)
    a = initialize(net, "xavier_normal", torch.Generator().manual_seed(1))
    assert a is net
    assert torch.all(net.bn.weight == 1) and torch.all(net.bn.bias == 0)
    assert torch.all(net.bn.running_mean == 0)
    assert torch.all(net.conv.bias == 0) and torch.all(net.head.bias == 0)
    assert net.scale.item() == 7.0  # parameters of other layer types are left alone
    before = net.head.weight.clone()
    initialize(net, "xavier_normal", torch.Generator().manual_seed(1))
    assert torch.equal(net.head.weight, before)


def test_unknown_names_list_choices():
    with pytest.raises(UsageError) as err:
        build("resnet18", (3, 32, 32), 10)
    msg = str(err.value)
    assert msg.startswith(
        "unknown model 'resnet18'; choose from: conv2, conv4, conv6, lenet_300_100"
    )
    assert "mlp_<w1>_<w2>..." in msg and "\n" not in msg
    for bad in ["mlp", "mlp_", "mlp_0", "mlp_10_x"]:
        with pytest.raises(UsageError, match="unknown model"):
            check(bad, (1, 28, 28), 10)
    with pytest.raises(UsageError, match="unknown init 'he'; choose from: kaiming_normal"):
        build("lenet_300_100", (1, 28, 28), 10, init="he")
    with pytest.raises(UsageError, match="unknown init"):
        initialize(nn.Linear(2, 2), "zeros")


def test_resnet50_is_he_et_al_imagenet_resnet50():
    model = build("resnet50", (3, 224, 224), 1000)
    # He et al. 2016's ResNet-50 (torchvision's count): 25,557,032 parameters
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 * 3 + 4  # stem, 16 bottlenecks of three, 4 projections
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_resnet50_imagenet_preset_is_a_valid_setup():
    from ticketlab.presets import preset
    from ticketlab.spec import Spec

    spec = Spec(**preset("resnet50_imagenet"))
    assert (spec.model, spec.dataset, spec.batch_size, spec.lr) == (
        "resnet50",
        "imagefolder",
        1024,
        0.4,
    )
    assert spec.milestones == ("30ep", "60ep", "80ep") and spec.warmup == "5ep"
