"""A decoder stage against the rule "the paper where it is explicit, SED where it is silent":
the paper's HDC (3x3, dilations 1/2/4, summed) and GELU MLP; SED's layer-scaled spatial residual,
class attention without an output projection, and class block (pooled attention + ReLU MLP added
to the un-pooled input); old checkpoints refused by config version."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpseg.errors import UserError
from dpseg.model import CONFIG_VERSION, DPSegConfig, build_dpseg, load_dpseg, save_dpseg
from dpseg.model.blocks import AggregationBlock, ClassAttention


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_dpseg(DPSegConfig(encoder="tiny"), weights=None).eval()


def test_every_stage_has_the_rules_structure(network):
    cfg = network.cfg
    assert len(network.decoder.blocks) == 3
    for block, dim in zip(network.decoder.blocks, (cfg.cost_dim, *cfg.decoder_dims[:-1]), strict=True):
        assert isinstance(block, AggregationBlock)
        # paper: HDC = three 3x3 convs at dilations 1, 2, 4 (depthwise, as SED's spatial conv)
        convs = block.spatial.hdc.convs
        assert [c.dilation for c in convs] == [(1, 1), (2, 2), (4, 4)]
        assert all(c.kernel_size == (3, 3) and c.groups == dim and c.padding == c.dilation for c in convs)
        # paper: norm then an MLP with GELU (x4, SED's ratio); SED: layer scale on that residual
        mlp = block.spatial.mlp
        assert isinstance(block.spatial.norm, nn.LayerNorm)
        assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.Linear] and mlp[0].out_features == 4 * dim
        assert block.spatial.gamma.shape == (dim,) and torch.all(block.spatial.gamma == 1.0)
        # SED's AttentionLayer: q, k, v projections and nothing after the attention
        attention = block.attention
        assert isinstance(attention, ClassAttention)
        assert [name for name, _ in attention.named_children()] == ["qkv"]
        assert sum(p.numel() for p in attention.parameters()) == dim * 3 * dim + 3 * dim
        # SED's class transformer: its MLP (x4, ReLU) after the attention
        assert [type(m) for m in block.mlp] == [nn.Linear, nn.ReLU, nn.Linear]


def _reference_stage(block: AggregationBlock, x: torch.Tensor) -> torch.Tensor:
    """The stage written out from the rule, with functional ops on the block's parameters."""
    b, n, c, h, w = x.shape
    flat = x.flatten(0, 1)
    s = block.spatial
    hdc = sum(
        F.conv2d(flat, conv.weight, conv.bias, padding=d, dilation=d, groups=c)
        for conv, d in zip(s.hdc.convs, (1, 2, 4), strict=True)
    ).permute(0, 2, 3, 1)
    mlp = F.linear(
        F.gelu(F.linear(F.layer_norm(hdc, (c,), s.norm.weight, s.norm.bias, 1e-6), *_wb(s.mlp[0]))), *_wb(s.mlp[2])
    )
    y = flat.permute(0, 2, 3, 1) + s.gamma * mlp  # (B*N, H, W, C)
    pool = block.pool
    p = F.avg_pool2d(y.permute(0, 3, 1, 2), pool, ceil_mode=True).permute(0, 2, 3, 1) if pool > 1 else y
    p = p.reshape(b, n, *p.shape[1:])
    norm1, norm2 = block.attention_norm, block.mlp_norm
    p = p + block.attention(F.layer_norm(p, (c,), norm1.weight, norm1.bias))
    p = p + F.linear(
        F.relu(F.linear(F.layer_norm(p, (c,), norm2.weight, norm2.bias), *_wb(block.mlp[0]))), *_wb(block.mlp[2])
    )
    up = F.interpolate(p.flatten(0, 1).permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=True)
    return (y.permute(0, 3, 1, 2) + up).view(b, n, c, h, w)  # the pooled path added to the un-pooled input


def _wb(linear: nn.Linear):
    return linear.weight, linear.bias


@pytest.mark.parametrize("training", [False, True])
def test_a_stage_computes_the_rules_function(training):
    torch.manual_seed(0)
    block = AggregationBlock(dim=16, heads=4, mlp_ratio=4, pool_train=2, pool_eval=1).train(training)
    with torch.no_grad():
        block.spatial.gamma.uniform_(0.5, 1.5)  # a trained gamma: each channel its own scale
    x = torch.randn(2, 3, 16, 6, 6)
    assert torch.allclose(block(x), _reference_stage(block, x), atol=1e-5)


def test_layer_scale_is_used_and_learned():
    torch.manual_seed(0)
    block = AggregationBlock(dim=8, heads=2, mlp_ratio=4).eval()
    x = torch.randn(1, 2, 8, 4, 4)
    with torch.no_grad():
        block.spatial.gamma.zero_()
        assert torch.equal(block.prepare(x), x.permute(0, 1, 3, 4, 2))  # gamma 0: the spatial block is the identity
        block.spatial.gamma.fill_(1.0)
        once = block.prepare(x) - x.permute(0, 1, 3, 4, 2)
        block.spatial.gamma.fill_(2.0)
        twice = block.prepare(x) - x.permute(0, 1, 3, 4, 2)
    assert torch.allclose(twice, 2 * once, atol=1e-6) and once.abs().max() > 0
    block.train()
    block(x).sum().backward()
    assert block.spatial.gamma.grad is not None and block.spatial.gamma.grad.abs().sum() > 0


def test_class_mlp_can_be_switched_off_for_an_ablation():
    cfg = DPSegConfig(encoder="tiny", class_mlp=False)
    torch.manual_seed(0)
    block = build_dpseg(cfg, weights=None).decoder.blocks[0]
    assert block.mlp is None and block.mlp_norm is None
    with pytest.raises(UserError, match="layer_scale_init must be positive"):
        DPSegConfig(encoder="tiny", layer_scale_init=0)


@pytest.mark.parametrize("old", [1, 2])
def test_a_checkpoint_of_an_older_network_is_refused_in_one_line_naming_the_version(tmp_path, network, old):
    path = save_dpseg(network, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["config_version"] = config["model"]["config_version"] = old
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load_dpseg(path)
    message = str(err.value)
    assert "\n" not in message
    assert f"model config version {old}; this dpseg builds config version {CONFIG_VERSION}" in message
    assert CONFIG_VERSION == 3
