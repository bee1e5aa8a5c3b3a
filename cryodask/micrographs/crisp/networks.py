"""The segmentation networks CRISP chooses between, in plain torch (no pretrained encoders).

CRISP builds ``segmentation_models_pytorch`` UNet++ / DeepLabV3 on an ImageNet EfficientNet-B5.
Neither those packages nor weights are available offline, so both families are written here
from scratch, small enough to train on a CPU: a U-Net and a DeepLabV3+-style network (strided
encoder, atrous spatial pyramid pooling, one skip from the high-resolution features). Both
take (N, 1, H, W) standardised images of any size and return (N, 2, H, W) logits
(background, particle), as CRISP's ``classes=2`` models do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NETWORKS = ("unet", "deeplab")
DEFAULT_WIDTHS = {"unet": (16, 32, 64, 128), "deeplab": (16, 32, 64, 96)}


def _conv(cin: int, cout: int, dilation: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _double(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv(cin, cout), _conv(cout, cout))


class UNet(nn.Module):
    """U-Net (Ronneberger 2015): ``len(widths)`` levels, two 3×3 conv + BN + ReLU per level,
    max-pool down, bilinear up + concatenation. Inputs are reflect-padded to a multiple of the
    total stride and the output cropped back, so any image size works."""

    def __init__(self, widths=DEFAULT_WIDTHS["unet"], in_channels: int = 1, classes: int = 2):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.stride = 2 ** (len(widths) - 1)
        self.down = nn.ModuleList([_double(cin, cout) for cin, cout in zip((in_channels,) + widths[:-1], widths)])
        self.up = nn.ModuleList([_double(widths[i] + widths[i + 1], widths[i]) for i in range(len(widths) - 2, -1, -1)])
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = _pad_to(x, self.stride)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x)[..., :h, :w]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): a 1×1 conv, three dilated 3×3 convs and
    global image pooling, concatenated and projected."""

    def __init__(self, cin: int, cout: int, rates=(2, 4, 6)):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                                     nn.ReLU(inplace=True))]
                                      + [_conv(cin, cout, dilation=r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(cout * (len(rates) + 2), cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLab(nn.Module):
    """DeepLabV3+-style: an encoder of strided conv stages (output stride 2^(len(widths)-1)),
    ASPP on the deepest features, bilinear upsampling fused with the stride-2 features, and a
    bilinear upsampling of the logits to the input size (odd sizes included)."""

    def __init__(self, widths=DEFAULT_WIDTHS["deeplab"], in_channels: int = 1, classes: int = 2,
                 rates=(2, 4, 6)):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        stages = [_double(in_channels, widths[0])]
        stages += [nn.Sequential(_conv(cin, cout, stride=2), _conv(cout, cout))
                   for cin, cout in zip(widths, widths[1:])]
        self.stages = nn.ModuleList(stages)
        self.aspp = ASPP(widths[-1], widths[-1], rates)
        low = widths[1] if len(widths) > 1 else widths[0]
        self.fuse = nn.Sequential(_conv(widths[-1] + low, widths[0] * 2), _conv(widths[0] * 2, widths[0] * 2))
        self.head = nn.Conv2d(widths[0] * 2, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        low = None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == min(1, len(self.stages) - 1):
                low = x
        x = F.interpolate(self.aspp(x), size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.head(self.fuse(torch.cat([low, x], dim=1)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def build_network(name: str, widths=None) -> nn.Module:
    """A fresh network by name (``unet`` or ``deeplab``) with the given channel widths.

    Examples
    --------
    >>> net = build_network("unet", widths=(4, 8))
    >>> net(torch.zeros(1, 1, 33, 35)).shape
    torch.Size([1, 2, 33, 35])
    """
    from ...errors import InputError

    if name not in NETWORKS:
        raise InputError(f"--model must be one of {', '.join(NETWORKS)}, got {name!r}")
    widths = tuple(widths) if widths else DEFAULT_WIDTHS[name]
    if not widths or min(widths) < 1:
        raise InputError(f"network widths must be positive integers, got {widths}")
    return UNet(widths) if name == "unet" else DeepLab(widths)
