"""Plain PyTorch network constructors used by the benchmarks.

Only ``torch`` is needed: no Pyro and no torchvision. Every constructor returns an ordinary
``nn.Module`` that maps a batch of inputs to logits of shape ``(B, num_classes)``; making it Bayesian is
the job of the guides and priors elsewhere in the package.

``build(name, input_shape, num_classes)`` picks constructor arguments from a data set's input shape,
``(C, H, W)`` for images or ``(D,)`` for flat features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .validation import check_count

__all__ = ["NETS", "BasicBlock", "ResNet", "build", "lenet5", "mlp", "resnet18", "resnet20", "vgg16"]

_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (100,),
    num_classes: int = 10,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Fully connected network ``Flatten -> [Linear -> activation] * len(hidden) -> Linear``.

    Input ``(B, *input_shape)`` with ``prod(input_shape) == in_features``; output ``(B, num_classes)``.
    ``mlp(784, (400, 400), 10)`` is the classic 784-400-400-10 benchmark network.
    """
    check_count("in_features", in_features)
    check_count("num_classes", num_classes)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        check_count("hidden width", h)
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _lenet5_spatial(input_size: int) -> int:
    """Side length of the feature map after LeNet-5's second pooling layer."""
    size = input_size // 2  # conv 5x5 padding 2 keeps the size, then maxpool 2
    size = size - 4  # conv 5x5, no padding
    return size // 2  # maxpool 2


def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> nn.Module:
    """Classic LeNet-5 with ReLU activations and max pooling.

    Input ``(B, in_channels, input_size, input_size)``; output ``(B, num_classes)``. The flattened
    feature size is ``16 * s * s`` with ``s = (input_size // 2 - 4) // 2``: 400 for 28x28, 576 for 32x32.
    Raises ``ValueError`` when ``input_size`` is below 12, the smallest size leaving a 1x1 feature map.
    """
    check_count("in_channels", in_channels)
    check_count("num_classes", num_classes)
    spatial = _lenet5_spatial(input_size)
    if spatial < 1:
        raise ValueError(
            f"input_size={input_size} is too small for lenet5: the second conv/pool would leave a "
            f"{spatial}x{spatial} feature map; the minimum input_size is 12"
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * spatial * spatial, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv + BN) shortcut.

    Input ``(B, in_planes, H, W)``; output ``(B, planes, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem (no max-pool), BasicBlock stages, global average pool.

    Stage ``i`` has ``blocks[i]`` blocks of width ``widths[i]``; every stage after the first starts with a
    stride-2 block. Input ``(B, in_channels, H, W)`` (any ``H, W`` thanks to adaptive pooling);
    output ``(B, num_classes)``.
    """

    def __init__(
        self, widths: Sequence[int], blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        check_count("in_channels", in_channels)
        check_count("num_classes", num_classes)
        if len(widths) != len(blocks) or not widths:
            raise ValueError(
                f"widths and blocks must be non-empty and of equal length, got {widths}, {blocks}"
            )
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, width, stride=2 if i > 0 and j == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 (BasicBlock, 64/128/256/512 channels, 2 blocks per stage) with a CIFAR 3x3 stem.

    Input ``(B, in_channels, H, W)``, typically 32x32; output ``(B, num_classes)``.
    About 11.17M parameters for 10 classes, the same as torchvision's resnet18 with the stem swapped.
    """
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-20 of He et al. (2016): 16/32/64 channels, 3 stages of 3 BasicBlocks.

    Shortcuts are 1x1 conv + BN where the shape changes. Input ``(B, in_channels, H, W)``, typically
    32x32; output ``(B, num_classes)``. About 0.27M parameters.
    """
    return ResNet((16, 32, 64), (3, 3, 3), num_classes=num_classes, in_channels=in_channels)


def vgg16(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """VGG-16 with BatchNorm after every conv, for 32x32 inputs.

    Thirteen 3x3 conv-BN-ReLU layers and five 2x2 max-pools reduce ``(B, in_channels, 32, 32)`` to
    ``(B, 512, 1, 1)``; the classifier is a single ``Linear(512, num_classes)``. Output ``(B, num_classes)``.
    Larger inputs (multiples of 32) also work: the final feature map is average pooled to 1x1.
    """
    check_count("in_channels", in_channels)
    check_count("num_classes", num_classes)
    layers: list[nn.Module] = []
    channels = in_channels
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            assert isinstance(v, int)
            layers += [
                nn.Conv2d(channels, v, 3, padding=1, bias=False),
                nn.BatchNorm2d(v),
                nn.ReLU(inplace=True),
            ]
            channels = v
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


NETS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "mlp": mlp,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "vgg16": vgg16,
}


def build(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build net ``name`` for inputs of shape ``input_shape`` (``(C, H, W)`` or ``(D,)``, no batch dim).

    ``mlp`` gets ``in_features=prod(input_shape)``; ``lenet5`` gets ``in_channels=C, input_size=H`` and
    needs ``H == W``; the ResNets and VGG get ``in_channels=C``. Extra ``kwargs`` (e.g. ``hidden`` for
    ``mlp``) are passed through to the constructor. The result maps ``(B, *input_shape)`` to
    ``(B, num_classes)``.
    """
    if name not in NETS:
        raise ValueError(f"unknown net {name!r}; choose one of: {', '.join(sorted(NETS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got num_classes={num_classes}")
    input_shape = tuple(input_shape)
    if not input_shape or any(d < 1 for d in input_shape):
        raise ValueError(
            f"input_shape must be non-empty with positive entries, got input_shape={input_shape}"
        )
    if name == "mlp":
        return NETS[name](in_features=math.prod(input_shape), num_classes=num_classes, **kwargs)
    if len(input_shape) != 3:
        raise ValueError(f"net {name!r} needs input_shape (C, H, W), got input_shape={input_shape}")
    c, h, w = input_shape
    if name == "lenet5":
        if h != w:
            raise ValueError(f"lenet5 needs square inputs (H == W), got input_shape={input_shape}")
        return NETS[name](in_channels=c, num_classes=num_classes, input_size=h, **kwargs)
    return NETS[name](num_classes=num_classes, in_channels=c, **kwargs)
