"""The DPSeg network: cost volumes, decoder blocks, chunked decoding, gradients, loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import first_conv

from dpseg.errors import UserError
from dpseg.model import DPSegConfig, build_dpseg, deep_supervision_bce, segmentation_bce
from dpseg.model.blocks import ClassAttention, CostGuidance, StageFusion, UpsampledCostChain
from dpseg.model.cost_volume import cosine_cost, dual_prompt_embeddings, initial_cost
from dpseg.model.summary import model_summary, random_prompts

N_CLASSES = 5


def tiny_model(seed=0, **cfg):
    torch.manual_seed(seed)
    return build_dpseg(DPSegConfig(encoder="tiny", **cfg), weights=None).eval()


def prompts(model, n=N_CLASSES, seed=1, batch=None):
    torch.manual_seed(seed)
    return random_prompts(model, n, batch=batch)


# ---- cost volumes ---------------------------------------------------------------------------


def test_cosine_cost_matches_a_direct_computation():
    f, p = torch.randn(2, 8, 3, 4), torch.randn(5, 7, 8)
    cost = cosine_cost(f, p)
    assert cost.shape == (2, 7, 5, 3, 4)
    b, m, n, y, x = 1, 6, 2, 1, 3
    expected = F.cosine_similarity(f[b, :, y, x], p[n, m], dim=0)
    assert torch.allclose(cost[b, m, n, y, x], expected, atol=1e-6)
    batched = cosine_cost(f, p.unsqueeze(0).expand(2, -1, -1, -1))
    assert torch.allclose(batched, cost, atol=1e-6)


def test_dual_prompt_embedding_is_the_mean_of_unit_text_and_visual():
    t, v = torch.randn(3, 4, 8) * 5, torch.randn(3, 4, 8) * 0.1
    e = dual_prompt_embeddings(t, v)
    assert torch.allclose(e, (t / t.norm(dim=-1, keepdim=True) + v / v.norm(dim=-1, keepdim=True)) / 2)


def test_fusions_of_table_2b():
    dense, t, v = torch.randn(1, 8, 2, 2), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    ct, cv = cosine_cost(dense, t), cosine_cost(dense, v)
    assert torch.allclose(initial_cost(dense, t, v, "dual", "avg-costs"), (ct + cv) / 2)
    assert torch.equal(initial_cost(dense, t, v, "dual", "concat-costs"), torch.cat([ct, cv], 1))
    expected = cosine_cost(dense, dual_prompt_embeddings(t, v))
    assert torch.allclose(initial_cost(dense, t, v, "dual", "avg-embeddings"), expected)
    assert torch.equal(initial_cost(dense, t, None, "text", "avg-embeddings"), ct)


# ---- blocks against the computations they replace ------------------------------------------


def test_folded_guidance_equals_cost_volume_then_1x1_conv():
    torch.manual_seed(0)
    guidance = CostGuidance(cost_channels=6, dim=4)
    features, p = torch.randn(2, 8, 5, 5), torch.randn(3, 6, 8)
    cost = cosine_cost(features, p)  # (B, M, N, H, W): the volume Eq. 2 defines
    conv = torch.einsum("km,bmnhw->bnkhw", guidance.weight, cost) + guidance.bias.view(1, 1, -1, 1, 1)
    assert torch.allclose(guidance.from_prompts(features, p), conv, atol=1e-5)


def test_upsampled_cost_chain_is_seds_deconv_chain():
    torch.manual_seed(0)
    chain = UpsampledCostChain(cost_channels=80, dims=(32, 16, 8))
    # ConvTranspose2d(c_in, c_out, 2): c_in * c_out * 4 weights + c_out biases per step
    assert [sum(p.numel() for p in s.parameters()) for s in chain.steps] == [
        80 * 32 * 4 + 32,
        32 * 16 * 4 + 16,
        16 * 8 * 4 + 8,
    ]
    x = torch.randn(3, 80, 6, 6)
    outs = []
    for k, size in enumerate([(12, 12), (24, 24), (48, 48)]):
        x = chain.step(k, x, size)
        outs.append(x)
    assert [tuple(o.shape) for o in outs] == [(3, 32, 12, 12), (3, 16, 24, 24), (3, 8, 48, 48)]
    assert all((o >= 0).all() for o in outs)  # ReLU after every step
    # one step by hand: output pixel (2i+a, 2j+b) = bias + sum_c x[c, i, j] W[c, :, a, b]
    step = chain.steps[0]
    inp = torch.randn(1, 80, 2, 2)
    expected = torch.einsum("cij,cdab->diajb", inp[0], step.weight).reshape(32, 4, 4) + step.bias.view(32, 1, 1)
    assert torch.allclose(chain.step(0, inp, (4, 4))[0], F.relu(expected), atol=1e-5)


def test_stage_fusion_is_seds_double_conv_over_the_broadcast_concat():
    torch.manual_seed(0)
    fusion = StageFusion(in_dim=64, out_dim=32, skip_dim=16, guidance_dim=16)
    # hand-counted: deconv 64->48 (2x2) + 3x3 convs (48+16+16 -> 32, 32 -> 32, no bias) + two GroupNorms
    assert sum(p.numel() for p in fusion.parameters()) == (64 * 48 * 4 + 48) + 80 * 32 * 9 + 32 * 32 * 9 + 2 * 2 * 32
    assert fusion.norm1.num_groups == 2 and fusion.norm2.num_groups == 2  # one group per 16 channels (SED)
    state, skip, guide = torch.randn(2, 3, 64, 4, 4), torch.randn(2, 16, 8, 8), torch.randn(2, 3, 16, 8, 8)
    up = fusion.up(state.flatten(0, 1))
    assert up.shape == (6, 48, 8, 8)
    weight = torch.cat([fusion.from_state.weight, fusion.from_skip.weight, fusion.from_guidance.weight], dim=1)
    concat = torch.cat([up, skip.repeat_interleave(3, dim=0), guide.flatten(0, 1)], dim=1)
    y = F.relu(F.group_norm(F.conv2d(concat, weight, padding=1), 2, fusion.norm1.weight, fusion.norm1.bias))
    y = F.relu(F.group_norm(F.conv2d(y, fusion.conv2.weight, padding=1), 2, fusion.norm2.weight, fusion.norm2.bias))
    assert torch.allclose(fusion(state, skip, guide), y.view(2, 3, 32, 8, 8), atol=1e-5)


def test_stage_fusion_without_guidance_has_no_guidance_conv():
    fusion = StageFusion(in_dim=32, out_dim=16, skip_dim=8, guidance_dim=0)
    assert fusion.from_guidance is None and fusion.from_state.in_channels == 24
    assert fusion(torch.randn(1, 2, 32, 3, 3), torch.randn(1, 8, 6, 6), None).shape == (1, 2, 16, 6, 6)


def test_class_attention_matches_the_linear_attention_formula():
    torch.manual_seed(0)
    attention = ClassAttention(dim=8, heads=2)
    x = torch.randn(1, 4, 2, 2, 8)  # (B, N, H, W, C)
    q, k, v = attention.qkv(x).chunk(3, dim=-1)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    out = torch.empty(1, 4, 2, 2, 8)
    for y in range(2):
        for xx in range(2):
            for h in range(2):
                d = slice(4 * h, 4 * h + 4)
                qs, ks, vs = q[0, :, y, xx, d], k[0, :, y, xx, d], v[0, :, y, xx, d]
                weights = qs @ ks.T  # (N, N) unnormalised kernel scores
                out[0, :, y, xx, d] = (weights @ vs) / (weights.sum(dim=1, keepdim=True) + 1e-6)
    assert torch.allclose(attention(x), out, atol=1e-5)  # no output projection, as SED's AttentionLayer


def test_class_attention_is_permutation_equivariant_over_classes():
    torch.manual_seed(0)
    attention = ClassAttention(dim=8, heads=2)
    x = torch.randn(2, 5, 3, 3, 8)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(attention(x)[:, perm], attention(x[:, perm]), atol=1e-5)


# ---- the network ---------------------------------------------------------------------------


def test_shapes_at_every_stage_for_the_tiny_encoder():
    info = model_summary(DPSegConfig(encoder="tiny"), num_classes=7, size=128)
    s = info["shapes"]
    assert s["encoder.stride4"] == [1, 32, 32, 32] and s["encoder.dense"] == [1, 64, 4, 4]  # test_resnet: 32 ch at /4
    assert info["cost_volume_shape"] == [1, 80, 7, 4, 4]
    assert s["cost_embed"] == [1, 7, 128, 4, 4]
    assert s["stage0.aggregate"] == [1, 7, 128, 4, 4]
    assert [s[f"stage{k}.out"] for k in range(3)] == [[1, 7, 64, 8, 8], [1, 7, 32, 16, 16], [1, 7, 16, 32, 32]]
    assert [s[f"stage{k}.skip"] for k in range(3)] == [[1, 32, 8, 8], [1, 16, 16, 16], [1, 8, 32, 32]]
    assert [s[f"stage{k}.aux"] for k in range(3)] == [[1, 7, 1, 4, 4], [1, 7, 1, 8, 8], [1, 7, 1, 16, 16]]
    assert s["head"] == [1, 7, 1, 32, 32] and info["logits_shape"] == [1, 7, 32, 32]


@pytest.mark.parametrize(
    "encoder, embed, channels",
    [
        ("convnext-b", 640, [128, 256, 512, 1024]),
        ("convnext-l", 768, [192, 384, 768, 1536]),
    ],
)
def test_summary_of_the_paper_encoders(encoder, embed, channels):
    info = model_summary(DPSegConfig(encoder=encoder), num_classes=171, size=768)
    assert info["embed_dim"] == embed and info["stage_channels"] == channels
    assert info["strides"] == [4, 8, 16, 32] and info["templates"] == 80
    assert info["cost_volume_shape"] == [1, 80, 171, 24, 24]
    assert info["decoder_dims"] == [64, 32, 16]
    assert info["skip_channels"] == [32, 16, 8]  # SED's DECODER_GUIDANCE_PROJ_DIMS for B and L
    assert info["logits_shape"] == [1, 171, 192, 192]
    assert info["params_frozen"] > info["params_trainable"] > info["params_decoder"] > 0


def test_forward_gives_one_logit_map_per_class_at_stride_4():
    model = tiny_model()
    text, visual = prompts(model)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 96, 64), text=text, visual=visual)
    assert logits.shape == (2, N_CLASSES, 24, 16)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"fusion": "concat-costs"},
        {"fusion": "avg-costs"},
        {"visual_guidance": "upsampled-cost"},
        {"prompt_mode": "text", "visual_guidance": "upsampled-cost"},
        {"prompt_mode": "visual"},
        {"visual_guidance": "none"},
        {"guidance_stages": (True, False, True)},
        {"deep_supervision": False},
    ],
)
def test_chunked_decoding_equals_one_pass_in_every_mode(cfg):
    model = tiny_model(**cfg)
    text, visual = prompts(model, n=7)
    with torch.no_grad():
        features = model.encode_image(torch.randn(2, 3, 64, 64))
        whole = model(text=text, visual=visual, features=features)
        for chunk in (1, 3, 6):
            chunked = model(text=text, visual=visual, features=features, class_chunk=chunk)
            assert torch.allclose(chunked, whole, atol=1e-5)


def test_ablation_modes_change_the_output():
    images = torch.randn(1, 3, 64, 64)
    outs = {}
    for name, cfg in {
        "dual": {},
        "text": {"prompt_mode": "text", "visual_guidance": "upsampled-cost"},
        "visual": {"prompt_mode": "visual"},
        "upsampled": {"visual_guidance": "upsampled-cost"},
    }.items():
        model = tiny_model(**cfg)
        text, visual = prompts(model)
        with torch.no_grad():
            outs[name] = model(images, text=text, visual=visual)
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_per_image_visual_prompts_only_change_their_image():
    model = tiny_model()
    text, visual = prompts(model)
    features = model.encode_image(torch.randn(2, 3, 64, 64))
    refined = visual.per_image(2)
    refined.embedding[1, 2] = torch.randn_like(refined.embedding[1, 2])
    for stride in refined.pooled:
        refined.pooled[stride][1, 2] = torch.randn_like(refined.pooled[stride][1, 2])
    with torch.no_grad():
        before = model(text=text, visual=visual, features=features)
        after = model(text=text, visual=refined, features=features)
    # per-image prompts take another einsum path: equal up to float rounding (~1e-6 measured)
    assert torch.allclose(before[0], after[0], atol=1e-5)
    assert not torch.allclose(before[1], after[1])


def test_same_seed_same_logits():
    images = torch.randn(1, 3, 64, 64)
    runs = []
    for _ in range(2):
        model = tiny_model(seed=5)
        text, visual = prompts(model, seed=6)
        with torch.no_grad():
            runs.append(model(images, text=text, visual=visual))
    assert torch.equal(runs[0], runs[1])
    other = tiny_model(seed=7)
    with torch.no_grad():
        assert not torch.allclose(other(images, text=text, visual=visual), runs[0])


def test_gradients_reach_decoder_and_image_tower_but_not_frozen_towers():
    model = tiny_model()
    model.train()
    text, visual = prompts(model)
    logits, aux = model(torch.randn(2, 3, 64, 64), text=text, visual=visual, aux=True)
    deep_supervision_bce(logits, aux, torch.randint(0, N_CLASSES, (2, 64, 64))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    assert first_conv(model.image_encoder).weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.prompt_encoder.parameters())
    assert all(p.grad is None for p in model.text_encoder.parameters())


@pytest.mark.parametrize(
    "guidance, guidance_grad, reaches_stride4",
    [
        ("upsampled-cost", False, False),
        ("prompt", False, False),
        ("prompt", True, True),
        ("none", True, False),
    ],
)
def test_skips_are_detached_and_visual_costs_follow_guidance_grad(guidance, guidance_grad, reaches_stride4):
    model = tiny_model(visual_guidance=guidance, guidance_grad=guidance_grad)
    text, visual = prompts(model)
    features = model.encode_image(torch.randn(1, 3, 64, 64)).detach()
    for f in [*features.levels.values(), features.dense]:
        f.requires_grad_(True)
    model(text=text, visual=visual, features=features).sum().backward()
    # stride 4 feeds only the detached skip and, with prompt guidance, Eq. 2's cost volume
    assert (features.levels[4].grad is not None) == reaches_stride4
    assert features.dense.grad is not None and features.dense.grad.abs().sum() > 0
    assert model.decoder.skips[2][0].weight.grad is not None  # the skip conv itself learns


def test_aux_heads_get_gradient_only_for_themselves():
    model = tiny_model()
    model.train()
    text, visual = prompts(model)
    _, aux = model(torch.randn(1, 3, 64, 64), text=text, visual=visual, aux=True)
    sum(a.sum() for a in aux).backward()  # aux heads read detached states (SED)
    heads = {id(p) for p in model.decoder.aux_heads.parameters()}
    assert all(p.grad is not None for p in model.decoder.aux_heads.parameters())
    assert all(p.grad is None for p in model.parameters() if id(p) not in heads)


def test_param_groups_scale_the_image_tower_lr_and_skip_decay_on_norms_and_biases():
    model = tiny_model()
    groups = {g["name"]: g for g in model.param_groups(lr=2e-4, weight_decay=1e-4)}
    assert sorted(groups) == ["decoder", "decoder_no_decay", "image_encoder", "image_encoder_no_decay"]
    assert groups["decoder"]["lr"] == groups["decoder_no_decay"]["lr"] == 2e-4
    assert groups["image_encoder"]["lr"] == groups["image_encoder_no_decay"]["lr"] == pytest.approx(2e-6)
    assert groups["decoder"]["weight_decay"] == 1e-4 and groups["decoder_no_decay"]["weight_decay"] == 0.0
    in_groups = [id(p) for g in groups.values() for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}
    # independently: every norm layer's parameters and every bias are in a no-decay group
    no_decay = {id(p) for name in ("decoder_no_decay", "image_encoder_no_decay") for p in groups[name]["params"]}
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)
    expected = {
        id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False) if p.requires_grad
    }
    expected |= {id(p) for n, p in model.named_parameters() if n.endswith(".bias") and p.requires_grad}
    assert no_decay == expected
    assert id(model.decoder.fusions[0].norm1.weight) in no_decay and id(model.decoder.head.weight) not in no_decay
    torch.optim.AdamW(model.param_groups(2e-4, 1e-4))  # accepted as given


def test_prompt_shape_errors_name_the_problem():
    model = tiny_model()
    text, visual = prompts(model)
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(UserError, match="needs text prompts"):
        model(images, visual=visual)
    with pytest.raises(UserError, match="templates; the model was built for 80"):
        model(images, text=text[:, :10], visual=visual)
    with pytest.raises(UserError, match="disagree on the number of classes"):
        model(images, text=text[:3], visual=visual)
    with pytest.raises(UserError, match="multiple of 32"):
        model(torch.randn(1, 3, 60, 64), text=text, visual=visual)


def test_config_rejects_inconsistent_ablations():
    with pytest.raises(UserError, match="set visual_guidance 'upsampled-cost'"):
        DPSegConfig(prompt_mode="text")
    with pytest.raises(UserError, match="needs prompt_mode 'dual'"):
        DPSegConfig(prompt_mode="visual", fusion="concat-costs")
    with pytest.raises(UserError, match="fusion 'max' is not one of"):
        DPSegConfig(fusion="max")
    cfg = DPSegConfig(encoder="tiny", fusion="avg-costs")
    assert DPSegConfig.from_dict(cfg.to_dict()) == cfg


# ---- loss ------------------------------------------------------------------------------------


def _reference_bce(logits, labels, ignore, policy):
    lg, lb = logits.numpy().astype(np.float64), labels.numpy()
    b, n, h, w = lg.shape
    total, count = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if lb[i, y, x] == ignore and policy == "exclude":
                    continue
                for c in range(n):
                    t = 1.0 if lb[i, y, x] == c else 0.0
                    z = lg[i, c, y, x]
                    total += max(z, 0) - z * t + np.log1p(np.exp(-abs(z)))
                    count += 1
    return total / count


@pytest.mark.parametrize("policy", ["negative", "exclude"])
def test_bce_matches_a_direct_computation_for_each_ignore_policy(policy):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, :2] = 255
    got = segmentation_bce(logits, labels, policy=policy)
    assert got.item() == pytest.approx(_reference_bce(logits, labels, 255, policy), rel=1e-5)


def test_bce_upsamples_logits_and_accepts_the_a847_ignore_value():
    logits = torch.randn(1, 4, 2, 2)
    labels = torch.full((1, 8, 8), 65535, dtype=torch.int32)
    labels[0, 0, 0] = 3
    loss = segmentation_bce(logits, labels, ignore_index=65535, policy="exclude")
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    target = torch.zeros(4)
    target[3] = 1
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(up[0, :, 0, 0], target).item(), rel=1e-5)


def test_bce_rejects_labels_outside_the_vocabulary():
    with pytest.raises(UserError, match="outside 0..2"):
        segmentation_bce(torch.randn(1, 3, 2, 2), torch.tensor([[[0, 7], [1, 2]]]))


def test_image_lr_multiplier_zero_freezes_the_image_tower():
    model = tiny_model(image_lr_multiplier=0.0).train()
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert [g["name"] for g in model.param_groups(lr=1e-3, weight_decay=1e-4)] == ["decoder", "decoder_no_decay"]
    text, visual = prompts(model)
    logits = model(torch.randn(1, 3, 64, 64), text=text, visual=visual)
    logits.sum().backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert model.decoder.head.weight.grad is not None
