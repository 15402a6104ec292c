"""Models of `ncfast train`: an MLP, ResNet-18/34/50 (CIFAR stem or torchvision's ImageNet stem)
and WideResNet-28-10, each ending in one nn.Linear classifier whose input is the feature that the
NC metrics measure. Optional bottleneck width d and a fixed simplex-ETF classifier (theory.md 6)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ConfigError, ModelConfig


def simplex_etf(K: int, d: int) -> torch.Tensor:
    """(K, d) unit rows with pairwise cosine -1/(K-1): W W^T = K/(K-1) (I - 11^T/K).
    d >= K: sqrt(K/(K-1)) P [I_K, 0] (theory.md 6.2); d = K-1: the same frame written in an
    orthonormal basis of P's range."""
    if K < 2 or d < K - 1:
        raise ConfigError(f"model.fixed_etf needs num_classes >= 2 and feature dimension "
                          f"d >= K-1 = {K - 1}, got K={K}, d={d}")
    P = torch.eye(K, dtype=torch.float64) - 1.0 / K
    if d >= K:
        basis = torch.cat([P, torch.zeros(K, d - K, dtype=torch.float64)], 1)
    else:
        eigvals, eigvecs = torch.linalg.eigh(P)  # eigenvalues 0, 1, ..., 1
        basis = eigvecs[:, 1:]  # P = U U^T, U: (K, K-1)
    return (math.sqrt(K / (K - 1)) * basis).float()


def classifier(d: int, K: int, cfg: ModelConfig) -> nn.Linear:
    fc = nn.Linear(d, K, bias=cfg.bias)
    if cfg.fixed_etf:
        with torch.no_grad():
            fc.weight.copy_(simplex_etf(K, d))
        fc.weight.requires_grad_(False)  # neither trained nor decayed; the bias still is
    return fc


class MLP(nn.Module):
    def __init__(self, in_features: int, K: int, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        widths = list(cfg.hidden) + ([cfg.feature_dim] if cfg.feature_dim else [])
        for w in widths:
            layers += [nn.Linear(width, w)] + ([nn.BatchNorm1d(w)] if cfg.batch_norm else []) \
                + [nn.ReLU(inplace=True)]
            width = w
        self.features = nn.Sequential(*layers)
        self.fc = classifier(width, K, cfg)

    def forward(self, x):
        return self.fc(self.features(x))


def _resnet(arch: str, K: int, in_channels: int, cfg: ModelConfig) -> nn.Module:
    """torchvision's ResNet; the CIFAR stem swaps conv1 for a 3x3 stride-1 conv and drops the
    max-pool. A bottleneck width d replaces the last block's final conv (and BN) by one with d
    output channels and gives that block a 1x1 projection shortcut (theory.md 6.3)."""
    from torchvision import models
    from torchvision.models.resnet import BasicBlock

    model = getattr(models, arch)(weights=None, num_classes=K)
    if cfg.stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    width = model.fc.in_features
    if cfg.feature_dim and cfg.feature_dim != width:
        d = cfg.feature_dim
        block = model.layer4[-1]
        if isinstance(block, BasicBlock):
            block.conv2 = nn.Conv2d(block.conv2.in_channels, d, 3, 1, 1, bias=False)
            block.bn2 = nn.BatchNorm2d(d)
        else:
            block.conv3 = nn.Conv2d(block.conv3.in_channels, d, 1, bias=False)
            block.bn3 = nn.BatchNorm2d(d)
        block.downsample = nn.Sequential(nn.Conv2d(width, d, 1, bias=False), nn.BatchNorm2d(d))
        width = d
    model.fc = classifier(width, K, cfg)
    for m in model.modules():  # the paper's init: Kaiming-normal (fan-out) convs, BN 1 / 0
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


class _WideBlock(nn.Module):
    """Pre-activation wide basic block (Zagoruyko & Komodakis)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if c_in == c_out and stride == 1 else nn.Conv2d(
            c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(torch.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 inputs; depth 28, widen 10 is WRN-28-10 (36.5M parameters)."""

    def __init__(self, K: int, in_channels: int, cfg: ModelConfig, depth: int = 28,
                 widen: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        c = widths[0]
        for group, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(_WideBlock(c, group, stride if i == 0 else 1))
                c = group
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                   nn.Flatten()]
        if cfg.feature_dim and cfg.feature_dim != c:
            layers += [nn.Linear(c, cfg.feature_dim), nn.ReLU(inplace=True)]
            c = cfg.feature_dim
        self.features = nn.Sequential(*layers)
        self.fc = classifier(c, K, cfg)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.features(x))


def build_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if cfg.arch == "mlp":
        return MLP(math.prod(input_shape), num_classes, cfg)
    if len(input_shape) != 3:
        raise ConfigError(f"model.arch={cfg.arch!r} needs image inputs (C, H, W), got inputs of "
                          f"shape {list(input_shape)}; use model.arch='mlp'")
    if cfg.arch == "wrn28_10":
        return WideResNet(num_classes, input_shape[0], cfg)
    return _resnet(cfg.arch, num_classes, input_shape[0], cfg)
