"""Models: the small CNN of the FedMoE-DA paper, NIID-Bench's LeNet-style CNN, ResNet-MoE (CIFAR ResNet whose block
convolutions are MoE convolutions with a per-layer router), FedCoE's shared gate and
its light private parts. Every expert network exposes ``features(x)`` -> [B, d],
``classifier`` (a Linear on those features) and ``load_balance_loss()``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExperimentConfig


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class SmallCNN(nn.Module):
    """Two conv + two FC layers (McMahan et al.; FedMoE-DA's CNN). Parameter groups by
    prefix: ``conv1`` (FedMoE-DA's embedding), ``conv1``+``conv2`` (FedPer's body),
    ``fc1``+``fc2`` (FedPer's head). ``trunk(x)`` runs the first ``trunk_convs`` convolutions
    and ``head_features`` the rest (FedCoE's split between its shared trunk and its experts)."""

    def __init__(self, num_classes: int, image_size: int = 32, width: float = 1.0, hidden: int = 0,
                 trunk_convs: int = 2):
        super().__init__()
        c1, c2, hidden = int(32 * width), int(64 * width), hidden or int(512 * width)
        self.conv1 = nn.Conv2d(3, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden
        self.trunk_convs = trunk_convs

    @property
    def convs(self) -> tuple[nn.Conv2d, nn.Conv2d]:
        return self.conv1, self.conv2

    @property
    def trunk_prefixes(self) -> tuple[str, ...]:
        """FedCoE's shared trunk: the first ``trunk_convs`` convolutions."""
        return ("conv1.", "conv2.")[:self.trunk_convs]

    @property
    def trunk_channels(self) -> int:
        return self.convs[self.trunk_convs - 1].out_channels

    def conv_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.convs[index](x)), 2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(0, x)

    def features_from_embedding(self, h: torch.Tensor) -> torch.Tensor:
        return self.dense_features(self.trunk_from_embedding(h))

    def trunk_from_embedding(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_block(1, h)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(self.trunk_convs):
            x = self.conv_block(index, x)
        return x

    def head_features(self, h: torch.Tensor) -> torch.Tensor:
        for index in range(self.trunk_convs, len(self.convs)):
            h = self.conv_block(index, h)
        return self.dense_features(h)

    def dense_features(self, h: torch.Tensor) -> torch.Tensor:
        """The FC layers' features from the last convolution's output."""
        return F.relu(self.fc1(h.flatten(1)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_features(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def load_balance_loss(self) -> torch.Tensor:
        return torch.zeros(())


class LeNetCNN(SmallCNN):
    """NIID-Bench's simple CNN (Li et al. 2022; Flower's ``baselines/niid_bench``): conv 6 and
    16 channels of 5x5, each with ReLU and 2x2 max-pool, FC 120 and 84, then the classes.
    The same parameter groups as SmallCNN, plus ``fc2`` in the head."""

    def __init__(self, num_classes: int, image_size: int = 32, width: float = 1.0, trunk_convs: int = 2):
        nn.Module.__init__(self)
        c1, c2 = int(6 * width), int(16 * width)
        hidden1, hidden2 = int(120 * width), int(84 * width)
        self.conv1 = nn.Conv2d(3, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(c2 * side * side, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.classifier = nn.Linear(hidden2, num_classes)
        self.feature_dim = hidden2
        self.trunk_convs = trunk_convs

    def dense_features(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(h.flatten(1)))))


class MoEConv2d(nn.Module):
    """A convolution with ``num_experts`` kernels mixed per sample by a router
    (global average pool of the input -> linear -> softmax, top-k kept). Conv is linear
    in its kernel, so one conv with E*out channels followed by the weighted sum equals
    the conv with the mixed kernel."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k, self.out_ch, self.stride = num_experts, top_k, out_ch, stride
        self.weight = nn.Parameter(torch.empty(num_experts * out_ch, in_ch, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.router = nn.Linear(in_ch, num_experts)
        self.padding = kernel // 2
        self.last_importance: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(x.mean(dim=(2, 3))), dim=1)
        self.last_importance = probs.sum(0)
        if self.top_k < self.num_experts:
            top = probs.topk(self.top_k, dim=1)
            probs = torch.zeros_like(probs).scatter(1, top.indices, top.values)
            probs = probs / probs.sum(1, keepdim=True)
        return probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.route(x)
        y = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        b, _, h, w = y.shape
        y = y.view(b, self.num_experts, self.out_ch, h, w)
        return (y * gates[:, :, None, None, None]).sum(1)


class MoEBasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, cfg: ExperimentConfig):
        super().__init__()
        e, k = cfg.inner_experts, cfg.inner_top_k
        self.conv1 = MoEConv2d(in_ch, out_ch, 3, stride, e, k)
        self.bn1 = _norm(cfg.norm, out_ch)
        self.conv2 = MoEConv2d(out_ch, out_ch, 3, 1, e, k)
        self.bn2 = _norm(cfg.norm, out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _norm(cfg.norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetMoE(nn.Module):
    """CIFAR ResNet (depth 6n+2: three stages of n blocks; depth 18: ResNet-18's four
    stages of two) with MoE convolutions in every residual block."""

    def __init__(self, num_classes: int, cfg: ExperimentConfig):
        super().__init__()
        w = max(1, int(cfg.resnet_width * cfg.width_multiplier))
        if cfg.resnet_depth == 18:
            widths, blocks = [w, 2 * w, 4 * w, 8 * w], [2, 2, 2, 2]
        else:
            n = (cfg.resnet_depth - 2) // 6
            widths, blocks = [w, 2 * w, 4 * w], [n, n, n]
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), _norm(cfg.norm, w), nn.ReLU())
        layers, in_ch = [], w
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(MoEBasicBlock(in_ch, width, stride, cfg))
                in_ch = width
        self.blocks = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)
        self.feature_dim = in_ch
        # FedCoE's shared trunk: the stem and every stage but the last
        self.split = len(layers) - blocks[-1]
        self.trunk_channels = widths[-2]
        self.trunk_prefixes = ("stem.",) + tuple(f"blocks.{i}." for i in range(self.split))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[:self.split](self.stem(x))

    def head_features(self, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[self.split:](h).mean(dim=(2, 3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_features(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def load_balance_loss(self) -> torch.Tensor:
        """Shazeer-style importance loss: squared coefficient of variation of each
        router's summed probabilities over the batch, summed over layers."""
        total = torch.zeros((), device=self.classifier.weight.device)
        for module in self.modules():
            if isinstance(module, MoEConv2d) and module.last_importance is not None:
                imp = module.last_importance
                total = total + imp.var(unbiased=False) / (imp.mean() ** 2 + 1e-10)
        return total


class GateNet(nn.Module):
    """FedCoE's shared gate phi: a small CNN -> logits over K experts. Over the image
    (3 channels, two strided convolutions) or over the shared trunk's feature map
    (``in_channels`` = the trunk's channels, already downsampled: stride 1)."""

    def __init__(self, num_experts: int, width: int = 16, in_channels: int = 3, stride: int = 2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride, 1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride, 1), nn.ReLU(),
        )
        self.out = nn.Linear(2 * width, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x).mean(dim=(2, 3)))


class GateMLP(nn.Module):
    """FedCoE's shared gate over the shared trunk's feature map flattened: one hidden layer, the
    shape of an expert's head, so that telling groups of classes apart gets the capacity that
    telling the classes apart has."""

    def __init__(self, num_experts: int, in_features: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, num_experts)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(h.flatten(1))))


def build_expert(cfg: ExperimentConfig, num_classes: int, trunk_convs: int = 2) -> nn.Module:
    """The config's network; ``trunk_convs``: how many of a CNN's convolutions ``trunk`` runs."""
    if cfg.model == "resnet_moe":
        return ResNetMoE(num_classes, cfg)
    if cfg.model == "lenet":
        return LeNetCNN(num_classes, cfg.image_size, cfg.width_multiplier, trunk_convs)
    return small_cnn(cfg, num_classes, trunk_convs)


def small_cnn(cfg: ExperimentConfig, num_classes: int, trunk_convs: int = 2) -> SmallCNN:
    return SmallCNN(num_classes, cfg.image_size, cfg.width_multiplier, cfg.cnn_hidden, trunk_convs)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
