"""Models: shapes, MoE convolution equal to a per-sample mixed-kernel convolution,
top-k routing, load-balancing loss, gate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedcoe_flwr.config import from_dict
from fedcoe_flwr.models import (GateNet, LeNetCNN, MoEBasicBlock, MoEConv2d, ResNetMoE, SmallCNN, build_expert,
                                num_parameters, pick_device)


def resnet_cfg(**kw):
    values = dict(model="resnet_moe", resnet_depth=8, resnet_width=4, inner_experts=3, inner_top_k=3)
    values.update(kw)
    return from_dict(values)


# ------------------------------------------------------------------ SmallCNN
@pytest.mark.parametrize("size", [16, 32])
def test_small_cnn_shapes(size):
    model = SmallCNN(num_classes=7, image_size=size)
    x = torch.randn(5, 3, size, size)
    assert model(x).shape == (5, 7)
    assert model.features(x).shape == (5, model.feature_dim) == (5, 512)
    assert model.embed(x).shape == (5, 32, (size - 4) // 2, (size - 4) // 2)
    torch.testing.assert_close(model.classifier(model.features_from_embedding(model.embed(x))), model(x))
    assert model.load_balance_loss().item() == 0.0


def test_lenet_is_niid_benchs_simple_cnn():
    # conv 3->6 and 6->16 of 5x5, FC 400->120->84->10: 62,006 parameters, as NIID-Bench's CNN
    model = build_expert(from_dict({"model": "lenet"}), 10)
    assert num_parameters(model) == 456 + 2416 + 48120 + 10164 + 850
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10) and model.features(x).shape == (2, model.feature_dim) == (2, 84)
    assert [n for n, _ in model.named_children()] == ["conv1", "conv2", "fc1", "fc2", "classifier"]


def test_width_multiplier_grows_the_cnn():
    small = build_expert(from_dict({"model": "cnn", "image_size": 16}), 10)
    wide = build_expert(from_dict({"model": "cnn", "image_size": 16, "width_multiplier": 2.0}), 10)
    assert isinstance(small, SmallCNN) and wide.feature_dim == 2 * small.feature_dim
    assert num_parameters(wide) > 2 * num_parameters(small)



def test_cnn_hidden_sets_the_fc_width_only():
    cfg = from_dict({"model": "cnn", "image_size": 32, "width_multiplier": 1.0, "cnn_hidden": 128})
    net = build_expert(cfg, 10)
    assert net.fc1.out_features == net.feature_dim == 128 and net.conv2.out_channels == 64
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    default = build_expert(from_dict({"model": "cnn", "image_size": 32, "width_multiplier": 0.5}), 10)
    assert default.feature_dim == 256  # 0 = 512 x width_multiplier


@pytest.mark.parametrize("cls", [SmallCNN, LeNetCNN])
def test_cnn_split_after_one_convolution_is_the_same_network(cls):
    whole, split = cls(num_classes=10), cls(num_classes=10, trunk_convs=1)
    split.load_state_dict(whole.state_dict())
    x = torch.randn(3, 3, 32, 32)
    assert split.trunk_prefixes == ("conv1.",) and whole.trunk_prefixes == ("conv1.", "conv2.")
    h = split.trunk(x)
    assert h.shape[1] == split.trunk_channels == split.conv1.out_channels
    torch.testing.assert_close(split.classifier(split.head_features(h)), whole(x))
    torch.testing.assert_close(split(x), whole(x))


@pytest.mark.parametrize("pool, matched", [("cnn_hidden=100", True), ("cnn_hidden=128", False),
                                           ("trunk_convs=1,cnn_hidden=76", True)])
def test_fedcoe_pools_of_the_comparison_against_the_capacity_matched_fedavg(pool, matched):
    """FedCoE's shared parameters (everything the server sends: gate, trunk, shared expert, expert
    heads) against the full-width CNN's (FedAvg x4): within 1% for the matched pools, 1.25x
    with 128-unit heads."""
    from fedcoe_flwr.algorithms.fedcoe import FedCoE

    values = {"model": "cnn", "width_multiplier": 1.0, "num_experts": 4}
    values.update((k, int(v)) for k, v in (item.split("=") for item in pool.split(",")))
    shared = sum(v.numel() for v in FedCoE().init_state(from_dict(values), 10).arrays.values())
    fedavg_x4 = num_parameters(build_expert(from_dict({"model": "cnn", "width_multiplier": 1.0}), 10))
    assert (abs(shared - fedavg_x4) / fedavg_x4 < 0.01) == matched
    assert matched or 1.2 < shared / fedavg_x4 < 1.3


# ------------------------------------------------------------------ MoEConv2d
def _per_sample_reference(conv: MoEConv2d, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Per sample b: one plain conv with the kernel sum_e g_be W_e."""
    e, out = conv.num_experts, conv.out_ch
    kernels = conv.weight.view(e, out, *conv.weight.shape[1:])
    outs = []
    for b in range(x.shape[0]):
        mixed = (gates[b].view(e, 1, 1, 1, 1) * kernels).sum(0)
        outs.append(F.conv2d(x[b:b + 1], mixed, stride=conv.stride, padding=conv.padding))
    return torch.cat(outs)


@pytest.mark.parametrize("stride,top_k", [(1, 3), (2, 3), (1, 1), (2, 2)])
def test_moe_conv_equals_conv_with_the_mixed_kernel(stride, top_k):
    torch.manual_seed(1)
    conv = MoEConv2d(in_ch=4, out_ch=5, kernel=3, stride=stride, num_experts=3, top_k=top_k)
    with torch.no_grad():
        conv.router.weight.mul_(10)  # make routing clearly sample dependent
    x = torch.randn(6, 4, 9, 9)
    y = conv(x)
    gates = conv.route(x)
    assert y.shape == (6, 5, (9 + stride - 1) // stride, (9 + stride - 1) // stride)
    torch.testing.assert_close(y, _per_sample_reference(conv, x, gates), rtol=1e-4, atol=1e-5)
    # the gates differ across samples, so a single shared kernel could not do this
    assert (gates - gates.mean(0)).abs().max() > 1e-3


def test_routing_keeps_top_k_gates_summing_to_one():
    torch.manual_seed(2)
    conv = MoEConv2d(8, 4, 3, 1, num_experts=5, top_k=2)
    x = torch.randn(16, 8, 6, 6)
    gates = conv.route(x)
    probs = F.softmax(conv.router(x.mean(dim=(2, 3))), dim=1)
    assert ((gates > 0).sum(1) == 2).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(16))
    # the kept experts are the two most probable ones, in their original ratio
    top = probs.topk(2, dim=1)
    kept = gates.gather(1, top.indices)
    torch.testing.assert_close(kept, top.values / top.values.sum(1, keepdim=True))
    # importance (for load balancing) is taken before the top-k cut
    torch.testing.assert_close(conv.last_importance, probs.sum(0))


def test_routing_with_all_experts_is_the_softmax():
    conv = MoEConv2d(3, 2, 3, 1, num_experts=4, top_k=4)
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(conv.route(x), F.softmax(conv.router(x.mean(dim=(2, 3))), dim=1))


def test_moe_conv_gradients_reach_router_and_kernels():
    conv = MoEConv2d(3, 2, 3, 1, num_experts=2, top_k=2)
    conv(torch.randn(4, 3, 5, 5)).pow(2).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.router.weight.grad is not None and conv.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ ResNet-MoE
@pytest.mark.parametrize("depth,blocks,stages", [(8, 3, 3), (14, 6, 3), (18, 8, 4)])
def test_resnet_moe_shapes(depth, blocks, stages):
    cfg = resnet_cfg(resnet_depth=depth, resnet_width=4, inner_experts=2, inner_top_k=1)
    model = ResNetMoE(num_classes=10, cfg=cfg)
    assert len(model.blocks) == blocks
    assert model.feature_dim == 4 * 2 ** (stages - 1)
    x = torch.randn(3, 3, 16, 16)
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, model.feature_dim)
    moe = [m for m in model.modules() if isinstance(m, MoEConv2d)]
    assert len(moe) == 2 * blocks and all(m.num_experts == 2 and m.top_k == 1 for m in moe)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_resnet_moe_norm_variants(norm):
    model = ResNetMoE(5, resnet_cfg(norm=norm))
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    has_gn = any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert has_bn == (norm == "batch") and has_gn == (norm == "group")
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_width_multiplier_widens_resnet():
    assert ResNetMoE(10, resnet_cfg(width_multiplier=2.0)).feature_dim == 2 * ResNetMoE(10, resnet_cfg()).feature_dim
    assert isinstance(build_expert(resnet_cfg(), 10), ResNetMoE)


def test_block_shortcut_only_when_shape_changes():
    cfg = resnet_cfg()
    assert isinstance(MoEBasicBlock(4, 4, 1, cfg).shortcut, torch.nn.Identity)
    down = MoEBasicBlock(4, 8, 2, cfg)
    assert not isinstance(down.shortcut, torch.nn.Identity)
    assert down(torch.randn(2, 4, 8, 8)).shape == (2, 8, 4, 4)


# ------------------------------------------------------------------ load balancing
def _moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoEConv2d)]


def test_load_balance_loss_zero_when_balanced_positive_otherwise():
    model = ResNetMoE(10, resnet_cfg(inner_experts=2, inner_top_k=2))
    assert model.load_balance_loss().item() == 0.0  # nothing routed yet
    layers = _moe_layers(model)
    for m in layers:
        m.last_importance = torch.tensor([2.0, 2.0])
    assert model.load_balance_loss().item() == pytest.approx(0.0, abs=1e-9)
    for m in layers:
        m.last_importance = torch.tensor([3.0, 1.0])  # var 1, mean 2 -> CV^2 = 0.25
    assert model.load_balance_loss().item() == pytest.approx(0.25 * len(layers), rel=1e-5)
    layers[0].last_importance = torch.tensor([4.0, 0.0])  # more skew, more loss (CV^2 = 1)
    assert model.load_balance_loss().item() == pytest.approx(0.25 * (len(layers) - 1) + 1.0, rel=1e-5)


def test_load_balance_loss_after_forward_is_differentiable():
    model = ResNetMoE(10, resnet_cfg(inner_experts=3, inner_top_k=1))
    model(torch.randn(8, 3, 8, 8))
    loss = model.load_balance_loss()
    assert loss.item() > 0
    loss.backward()
    assert _moe_layers(model)[0].router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ gate
@pytest.mark.parametrize("k,size", [(1, 8), (4, 16), (7, 32)])
def test_gate_output_shape(k, size):
    gate = GateNet(num_experts=k, width=4)
    assert gate(torch.randn(3, 3, size, size)).shape == (3, k)


def test_pick_device_cpu():
    assert pick_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
