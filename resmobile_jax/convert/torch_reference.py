"""The PyTorch reference ResMobileNet, assembled from torchvision's own modules.

Its `state_dict` is this project's canonical "torchvision-style checkpoint" (key layout in the README). Only the
converter and the tests import this module; torch is not a training dependency.
"""

from __future__ import annotations

from functools import partial

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig
from torchvision.models.resnet import Bottleneck

from resmobile_jax.models.architecture import BOTTLENECK_WIDTH, NUM_BOTTLENECKS, TAIL_CHANNELS, mid_block_specs

MOBILENET_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)  # as in torchvision's mobilenet_v3_large


class EmbeddingHead(nn.Module):
    """GAP -> Linear -> BatchNorm1d -> ReLU -> L2 normalize (Linear init as torchvision MobileNetV3's)."""

    def __init__(self, in_channels: int, embedding_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, embedding_dim)
        self.bn = nn.BatchNorm1d(embedding_dim)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return nn.functional.normalize(torch.relu(self.bn(self.fc(x))), dim=-1)


class TorchResMobileNet(nn.Module):
    """stem -> mid (15 InvertedResidual) -> tail (6 Bottleneck) -> head, NCHW in, (N, D) embeddings out."""

    def __init__(self, variant: str = "v2", embedding_dim: int = 512, v2_output_stride: int = 32):
        super().__init__()
        specs = mid_block_specs(variant, v2_output_stride)
        if variant == "v1":
            features = torchvision.models.mobilenet_v3_large(weights=None).features
            self.stem = features[0]
            self.mid = nn.Sequential(*features[1:16])
        else:
            resnet = torchvision.models.resnet18(weights=None)
            self.stem = nn.Sequential()
            for name in ("conv1", "bn1", "relu", "maxpool"):
                self.stem.add_module(name, getattr(resnet, name))
            self.mid = nn.Sequential(
                *[
                    InvertedResidual(
                        InvertedResidualConfig(
                            s.in_channels, s.kernel, s.expanded, s.out_channels, s.use_se, s.activation, s.stride, 1, 1.0
                        ),
                        MOBILENET_NORM,
                    )
                    for s in specs
                ]
            )
            _init_like_mobilenet_v3(self.mid)
        self.tail = nn.Sequential(*[Bottleneck(TAIL_CHANNELS, BOTTLENECK_WIDTH) for _ in range(NUM_BOTTLENECKS)])
        _init_like_resnet(self.tail)
        self.head = EmbeddingHead(TAIL_CHANNELS, embedding_dim)

    def stages(self, x) -> dict[str, torch.Tensor]:
        out = {}
        x = self.stem(x)
        out["stem"] = x
        for i, block in enumerate(self.mid):
            x = block(x)
            out[f"mid.{i}"] = x
        for i, block in enumerate(self.tail):
            x = block(x)
            out[f"tail.{i}"] = x
        out["embedding"] = self.head(x)
        return out

    def forward(self, x):
        return self.head(self.tail(self.mid(self.stem(x))))


def _init_like_mobilenet_v3(module: nn.Module) -> None:
    """torchvision MobileNetV3.__init__'s loop, applied to blocks built outside that class."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _init_like_resnet(module: nn.Module) -> None:
    """torchvision ResNet.__init__'s loop (zero_init_residual=False)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def build_reference(variant: str, embedding_dim: int = 512, v2_output_stride: int = 32, seed: int = 0) -> TorchResMobileNet:
    torch.manual_seed(seed)
    return TorchResMobileNet(variant, embedding_dim, v2_output_stride).eval()


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics, so parity checks exercise every tensor (fresh BN is
    the identity and would hide a mis-mapped mean or variance)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.num_batches_tracked.fill_(int(torch.randint(0, 1000, (1,), generator=g)))
        elif isinstance(m, nn.Linear):
            m.bias.copy_(0.01 * torch.randn(m.out_features, generator=g))
    return model
