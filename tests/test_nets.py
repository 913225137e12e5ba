import pytest
import torch
from torch import nn

from pyro_sparse import nets
from pyro_sparse.nets import NETS, build, lenet5, mlp, resnet18, resnet20, vgg16


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_mlp_digits_shape():
    model = mlp(64, (100,), 10)
    assert isinstance(model, nn.Sequential)
    assert isinstance(model[0], nn.Flatten)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_mlp_benchmark_architecture():
    model = mlp(784, (400, 400), 10)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 400), (400, 400), (400, 10)]
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_activation_and_no_hidden():
    model = mlp(10, (7, 5), 3, activation=nn.Tanh)
    assert sum(isinstance(m, nn.Tanh) for m in model) == 2
    assert model(torch.randn(4, 10)).shape == (4, 3)
    assert mlp(10, (), 3)(torch.randn(4, 10)).shape == (4, 3)


@pytest.mark.parametrize(("channels", "size", "flat"), [(1, 28, 400), (3, 32, 576)])
def test_lenet5_shapes(channels, size, flat):
    model = lenet5(in_channels=channels, num_classes=10, input_size=size)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[0].in_features == flat
    assert model(torch.randn(4, channels, size, size)).shape == (4, 10)


def test_lenet5_minimum_input_size():
    assert lenet5(input_size=12)(torch.randn(2, 1, 12, 12)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"input_size=11.*minimum.*12"):
        lenet5(input_size=11)


@pytest.mark.parametrize("ctor", [resnet18, vgg16, resnet20])
def test_cifar_nets_shapes(ctor):
    model = ctor(num_classes=10, in_channels=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnets_other_input_sizes():
    assert resnet20(num_classes=5, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    assert resnet20(num_classes=5)(torch.randn(2, 3, 20, 24)).shape == (2, 5)


def test_vgg16_structure():
    model = vgg16(num_classes=100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == len(bns) == 13
    assert len(pools) == 5
    assert all(c.bias is None for c in convs)
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 100)]


def test_resnet_convs_have_no_bias():
    for model in (resnet18(), resnet20()):
        assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet18_param_count_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.models.resnet18(num_classes=10)
    ref.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    ref.maxpool = nn.Identity()
    assert n_params(resnet18(num_classes=10)) == n_params(ref)
    assert 11.1e6 < n_params(ref) < 11.2e6


def test_resnet20_param_count():
    assert 0.26e6 <= n_params(resnet20(num_classes=10)) <= 0.28e6


def test_resnet20_backward_finite_grads():
    model = resnet20()
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_registry_names():
    assert sorted(NETS) == ["lenet5", "mlp", "resnet18", "resnet20", "vgg16"]


def test_build_mlp():
    model = build("mlp", (1, 8, 8), 10)
    first = [m for m in model if isinstance(m, nn.Linear)]
    assert (first[0].in_features, first[0].out_features) == (64, 100)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)

    model = build("mlp", (784,), 10, hidden=(400, 400))
    dims = [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)]
    assert dims == [(784, 400), (400, 400), (400, 10)]


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "vgg16", "lenet5"])
def test_build_passes_arguments(monkeypatch, name):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return nn.Identity()

    monkeypatch.setitem(nets.NETS, name, fake)
    build(name, (1, 28, 28), 7)
    if name == "lenet5":
        assert calls == [{"in_channels": 1, "num_classes": 7, "input_size": 28}]
    else:
        assert calls == [{"in_channels": 1, "num_classes": 7}]


def test_build_real_nets():
    assert build("lenet5", (3, 32, 32), 10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build("resnet20", (1, 28, 28), 4)(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_build_unknown_name():
    msg = "unknown net 'foo'; choose one of: lenet5, mlp, resnet18, resnet20, vgg16"
    with pytest.raises(ValueError) as info:
        build("foo", (3, 32, 32), 10)
    assert str(info.value) == msg


@pytest.mark.parametrize("num_classes", [0, -1])
def test_build_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        build("mlp", (64,), num_classes)


@pytest.mark.parametrize("shape", [(0, 28, 28), (1, -28, 28), (0,), ()])
def test_build_bad_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape"):
        build("mlp", shape, 10)


def test_build_lenet5_non_square():
    with pytest.raises(ValueError, match=r"H == W.*input_shape"):
        build("lenet5", (1, 28, 32), 10)


def test_build_lenet5_too_small():
    with pytest.raises(ValueError, match=r"input_size=8.*minimum"):
        build("lenet5", (1, 8, 8), 10)


def test_build_image_net_needs_chw():
    with pytest.raises(ValueError, match="input_shape"):
        build("resnet20", (64,), 10)
