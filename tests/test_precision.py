"""Precision: fp32 by default (SED's configs never enable AMP) for training, evaluation and the
paper profiles; under a bf16 autocast the cost volumes, attention sums, sigmoid and loss stay fp32."""

import pytest
import torch
import torch.nn.functional as F

from dpseg.errors import UserError
from dpseg.metrics import predict_labels
from dpseg.model import DPSegConfig, build_dpseg, segmentation_bce
from dpseg.model.blocks import ClassAttention, CostGuidance
from dpseg.model.cost_volume import cosine_cost, initial_cost
from dpseg.model.summary import random_prompts
from pipeline.evaluate.loop import EvalSettings
from pipeline.profiles import resolve
from pipeline.train.loop import TrainSettings, resolve_precision
from pipeline.train.resolve import check_numbers


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ---- defaults --------------------------------------------------------------------------------


def test_train_and_eval_default_to_fp32():
    assert TrainSettings().mixed_precision == "fp32"
    assert resolve_precision("fp32", gpu=True) == "no" and resolve_precision("no", gpu=True) == "no"
    assert resolve_precision("bf16", gpu=False) == "bf16"  # asked for: given, also on the CPU
    assert EvalSettings(checkpoint="c", dataset="d").precision == "fp32"


@pytest.mark.parametrize("profile", ["paper-b", "paper-l", "demo"])
def test_profiles_train_and_evaluate_in_fp32_unless_asked(profile):
    r = resolve({"profile": profile})
    assert r["train"].get("mixed_precision", TrainSettings().mixed_precision) == "fp32"
    assert r["eval"].get("precision", "fp32") == "fp32"
    asked = resolve({"profile": profile, "train": {"mixed_precision": "bf16"}, "eval": {"precision": "bf16"}})
    assert asked["train"]["mixed_precision"] == "bf16" and asked["eval"]["precision"] == "bf16"


def test_bad_precisions_are_one_line_errors():
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve_precision("fp16", gpu=False)
    with pytest.raises(UserError, match="--mixed-precision 'fp8' is not one of"):
        check_numbers(TrainSettings(dataset="d", mixed_precision="fp8"))
    with pytest.raises(UserError, match="precision 'half' is not one of fp32, bf16, fp16"):
        EvalSettings(checkpoint="c", dataset="d", precision="half").validate()


# ---- fp32 regions under autocast -------------------------------------------------------------


def test_cost_volumes_are_fp32_under_autocast_and_equal_the_fp32_computation():
    torch.manual_seed(0)
    features = torch.randn(2, 16, 5, 5).bfloat16()  # what a bf16 image tower hands over
    prompts = torch.randn(3, 7, 16)
    expected = cosine_cost(features.float(), prompts)
    with bf16_autocast():
        cost = cosine_cost(features, prompts)
        guidance = CostGuidance(cost_channels=7, dim=4)
        folded = guidance.from_prompts(features, prompts)
        dual = initial_cost(features, prompts, prompts.flip(0), "dual", "avg-embeddings")
    assert cost.dtype == folded.dtype == dual.dtype == torch.float32
    assert torch.equal(cost, expected)
    assert torch.allclose(folded, guidance.from_prompts(features.float(), prompts), atol=0, rtol=0)
    # a bf16 einsum would be off by ~1e-2; the fp32 one matches the direct cosine to float rounding
    direct = F.cosine_similarity(features.float()[1, :, 2, 3], prompts[2, 4], dim=0)
    assert abs(float(cost[1, 4, 2, 2, 3]) - float(direct)) < 1e-6


def test_without_autocast_a_bf16_model_keeps_bf16_outputs():
    features, prompts = torch.randn(1, 8, 3, 3).bfloat16(), torch.randn(2, 4, 8).bfloat16()
    assert cosine_cost(features, prompts).dtype == torch.bfloat16  # computed in fp32, handed back as given


def test_attention_sums_sigmoid_and_loss_are_fp32_under_autocast():
    torch.manual_seed(0)
    attention = ClassAttention(dim=8, heads=2)
    x = torch.randn(1, 5, 2, 2, 8)
    with bf16_autocast():
        kv, k_sum = attention.summarize(x)
        logits = torch.randn(2, 4, 8, 8).bfloat16()
        labels = torch.randint(0, 4, (2, 16, 16))
        loss = segmentation_bce(logits, labels)
        pred = predict_labels(logits, (16, 16))
    assert kv.dtype == k_sum.dtype == loss.dtype == torch.float32
    assert torch.equal(loss, segmentation_bce(logits.float(), labels))
    assert torch.equal(pred, predict_labels(logits.float(), (16, 16)))


def test_the_network_feeds_fp32_cost_volumes_to_the_decoder_under_autocast():
    torch.manual_seed(0)
    model = build_dpseg(DPSegConfig(encoder="tiny"), weights=None).eval()
    text, visual = random_prompts(model, 3)
    seen = {}

    def record(name, tensor):
        seen.setdefault(name, tensor.dtype)  # a hook that returns None changes nothing

    model.decoder.cost_embed.register_forward_pre_hook(lambda m, args: record("cost", args[0]))
    for k, g in model.decoder.guidance.items():
        g.register_forward_hook(lambda m, args, out, k=k: record(f"guidance{k}", out))
    with torch.no_grad(), bf16_autocast():
        logits = model(torch.randn(1, 3, 64, 64), text=text, visual=visual)
    assert seen == {
        "cost": torch.float32,
        "guidance0": torch.float32,
        "guidance1": torch.float32,
        "guidance2": torch.float32,
    }
    assert logits.dtype == torch.bfloat16  # the rest of the network did run in bf16
