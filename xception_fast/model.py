"""The reference Xception (Chollet 2017), eager PyTorch.

Every fused kernel in this package is judged against this model. It keeps the seed's building
blocks (a separable conv is ``dconv`` then ``pconv``; blocks hold ``sepconvN`` / ``bnN`` pairs)
and the paper's architecture: unpadded stem convs, 36 conv layers of which 34 are separable,
22,855,952 parameters with a 1000-class head.
"""
import torch
from torch import nn

__all__ = ["SeparableConv2d", "ResidualConnection", "EntryBlock", "MiddleBlock", "ExitBlock", "Xception"]


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 conv (``dconv``) followed by pointwise 1x1 conv (``pconv``), no bias, no
    non-linearity between them (the paper's ablation found none to be best)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.dconv = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pconv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x):
        return self.pconv(self.dconv(x))


class ResidualConnection(nn.Sequential):
    """The down-sampling shortcut: 1x1 stride-2 conv + BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class _DownsamplingBlock(nn.Module):
    """[ReLU] sepconv BN ReLU sepconv BN, max-pool, plus the projected shortcut."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, relu_first: bool):
        super().__init__()
        self.project = ResidualConnection(in_channels, out_channels)
        # The shortcut still reads the block input, so no ReLU here may be in place.
        self.relu1 = nn.ReLU() if relu_first else nn.Identity()
        self.sepconv1 = SeparableConv2d(in_channels, mid_channels)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu2 = nn.ReLU()
        self.sepconv2 = SeparableConv2d(mid_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        identity = self.project(x)
        x = self.bn1(self.sepconv1(self.relu1(x)))
        x = self.bn2(self.sepconv2(self.relu2(x)))
        return self.maxpool(x) + identity


class EntryBlock(_DownsamplingBlock):
    """Entry-flow module: grows the channels first (in -> out, out -> out)."""

    def __init__(self, in_channels: int, out_channels: int, relu_first: bool = True):
        super().__init__(in_channels, out_channels, out_channels, relu_first)


class ExitBlock(_DownsamplingBlock):
    """Exit-flow module: grows the channels last (in -> in, in -> out)."""

    def __init__(self, in_channels: int = 728, out_channels: int = 1024):
        super().__init__(in_channels, in_channels, out_channels, relu_first=True)


class MiddleBlock(nn.Module):
    """Middle-flow module: three ReLU -> sepconv -> BN triples plus the identity, each triple with
    its own weights."""

    def __init__(self, channels: int = 728):
        super().__init__()
        for i in (1, 2, 3):
            self.add_module(f"relu{i}", nn.ReLU())
            self.add_module(f"sepconv{i}", SeparableConv2d(channels, channels))
            self.add_module(f"bn{i}", nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.bn1(self.sepconv1(self.relu1(x)))
        out = self.bn2(self.sepconv2(self.relu2(out)))
        out = self.bn3(self.sepconv3(self.relu3(out)))
        return out + x


class Xception(nn.Module):
    """Xception for ``in_channels`` x H x W images, H and W at least 71.

    ``forward_features`` returns the 2048-channel map (10 x 10 at 299 x 299); ``forward`` adds
    global average pooling and the fully connected classifier. ``fused=True`` builds it with every
    separable unit fused (:func:`xception_fast.fuse`, with ``backend``); the state_dict is the same.
    """

    num_features = 2048

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, fused: bool = False, backend: str = "auto"):
        super().__init__()
        self.entry_conv1 = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.entry_conv2 = nn.Sequential(nn.Conv2d(32, 64, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.entry_block1 = EntryBlock(64, 128, relu_first=False)
        self.entry_block2 = EntryBlock(128, 256)
        self.entry_block3 = EntryBlock(256, 728)
        self.middle_flow = nn.ModuleList(MiddleBlock(728) for _ in range(8))
        self.exit_block = ExitBlock(728, 1024)
        self.exit_conv1 = nn.Sequential(SeparableConv2d(1024, 1536), nn.BatchNorm2d(1536), nn.ReLU())
        self.exit_conv2 = nn.Sequential(SeparableConv2d(1536, 2048), nn.BatchNorm2d(2048), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        self.reset_parameters()
        if fused:
            from .fusion import fuse

            fuse(self, backend=backend)

    @torch.no_grad()
    def reset_parameters(self):
        """Kaiming-normal convs, unit BatchNorm, small normal classifier (the seed's scheme)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        if x.dim() != 4 or x.shape[-1] < 71 or x.shape[-2] < 71:
            raise ValueError(f"Xception: x must be [N, C, H, W] with H, W >= 71, got shape {tuple(x.shape)}")
        x = self.entry_conv2(self.entry_conv1(x))
        x = self.entry_block3(self.entry_block2(self.entry_block1(x)))
        for block in self.middle_flow:
            x = block(x)
        x = self.exit_block(x)
        return self.exit_conv2(self.exit_conv1(x))

    def forward_head(self, features):
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
