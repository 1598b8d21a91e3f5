"""The pass-II probe (pipeline/analyze/fuse_verify.py): score fusion and crop agreement against
direct computations, and its pass I / pass II against `dpseg eval` on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run

from dpseg.data.shapes import UNSEEN
from dpseg.model.prompts import VisualPrompts
from dpseg.refine import Refinement, keep_refined
from pipeline.analyze.fuse_verify import (
    FALSE_AT_PASS1,
    KEPT,
    TRUE_GATED,
    crop_similarities,
    fuse_logits,
    keep_pass1_logits,
    kept_shares,
    own_class_rank,
    probe,
    separation_auc,
)


def test_fused_logits_carry_the_weighted_mean_of_the_two_probabilities():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fused = fuse_logits(a, b, 0.25)
    expected = 0.75 / (1 + torch.exp(-a)) + 0.25 / (1 + torch.exp(-b))
    assert torch.allclose(torch.sigmoid(fused), expected, atol=1e-6)
    assert torch.allclose(fuse_logits(a, b, 0.0), a, atol=1e-4)
    assert torch.allclose(fuse_logits(a, b, 1.0), b, atol=1e-4)


def test_own_class_rank_counts_the_prototypes_nearer_to_the_crop_than_its_class():
    torch.manual_seed(1)
    bank = torch.randn(5, 3, 6)
    prototypes = VisualPrompts(bank, {}).prototypes()
    unit = F.normalize(bank, dim=-1).mean(dim=1)
    assert torch.allclose(prototypes, unit / unit.norm(dim=-1, keepdim=True))
    crops = torch.randn(4, 6)  # class 4 has two crops: its first decides
    ref = Refinement(torch.tensor([0, 2, 4]), torch.tensor([9, 9, 9]), torch.tensor([1, 1, 2]), crops, {})
    similarities = crop_similarities(ref, prototypes)
    ranks = own_class_rank(similarities, ref.classes)
    for i, (c, row) in enumerate(zip([0, 2, 4], [0, 1, 2], strict=True)):
        sims = [float(F.cosine_similarity(crops[row], prototypes[n], dim=0)) for n in range(5)]
        assert torch.allclose(similarities[i], torch.tensor(sims), atol=1e-6)
        assert int(ranks[i]) == sum(s > sims[c] for s in sims)
    exact = Refinement(torch.tensor([3]), torch.tensor([9]), torch.tensor([1]), prototypes[3:4].clone(), {})
    assert own_class_rank(crop_similarities(exact, prototypes), exact.classes).tolist() == [0]


def test_separation_auc_is_the_share_of_positive_negative_pairs_ordered_right():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # ties on purpose
    positive = rng.random(40) < 0.4
    pairs = [(p, n) for p in scores[positive] for n in scores[~positive]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert separation_auc(scores, positive) == pytest.approx(expected)
    assert separation_auc(np.arange(4.0), np.array([False, False, True, True])) == 1.0
    assert separation_auc(np.arange(3.0), np.array([True, True, True])) is None


def test_kept_shares_split_a_rule_by_true_and_false_detections():
    kept = np.array([True, False, True, True, False])
    true = np.array([True, True, True, False, False])
    assert kept_shares(kept, true) == {"true detections kept": 2 / 3, "false detections kept": 0.5}
    assert kept_shares(kept[:3], true[:3])["false detections kept"] is None


def test_marked_classes_keep_their_pass_one_logits_and_the_others_take_pass_two():
    torch.manual_seed(0)
    logits1, logits2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    marked = torch.tensor([[True, False, False], [False, False, True]])
    out = keep_pass1_logits(logits1, logits2, marked)
    for b in range(2):
        for c in range(3):
            expected = logits1 if marked[b, c] else logits2
            assert torch.equal(out[b, c], expected[b, c])


def test_keep_refined_drops_the_refused_classes_and_their_crops():
    crops = torch.arange(4, dtype=torch.float32).view(4, 1)
    ref = Refinement(torch.tensor([1, 5, 7]), torch.tensor([3, 4, 5]), torch.tensor([1, 2, 1]), crops, {8: crops * 2})
    kept = keep_refined(ref, torch.tensor([False, True, True]))
    assert kept.classes.tolist() == [5, 7] and kept.counts.tolist() == [2, 1] and kept.areas.tolist() == [4, 5]
    assert kept.embedding.flatten().tolist() == [1.0, 2.0, 3.0] and torch.equal(kept.pooled[8], kept.embedding * 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from dpseg.data.synth import write_shapes_benchmark

    root = tmp_path_factory.mktemp("probe")
    write_shapes_benchmark(root / "shapes", images=1, val_images=4, size=64, progress=False)
    return tiny_run(root, list(UNSEEN), recipe={"crop_size": 64})


def test_the_probe_scores_pass_one_and_two_as_dpseg_eval_does(world):
    from pipeline.evaluate.loop import EvalSettings, evaluate

    result = probe(str(world / "ckpt"), str(world / "shapes"), "unseen", None)
    metrics = evaluate(
        EvalSettings(
            checkpoint=str(world / "ckpt"),
            dataset=str(world / "shapes"),
            out=str(world / "eval"),
            classes="unseen",
            num_workers=0,
            batch_size=8,
            bootstrap=0,
        ),
        progress=False,
    )
    assert result["images"] == 4
    assert result["miou"]["pass 1"] == pytest.approx(metrics["passes"]["1"]["miou"])
    assert result["miou"]["pass 2"] == pytest.approx(metrics["passes"]["2"]["miou"])
    assert set(result["miou"]) >= {
        "fused 0.5",
        "verified top 1",
        "verified top 3",
        "diagnostic: true detections only",
        KEPT,
        TRUE_GATED,
        FALSE_AT_PASS1,
    }
    for kept in result["pass I mean probability gates"].values():
        assert all(v is None or 0.0 <= v <= 1.0 for v in kept.values())
    for auc in result["true/false detection AUC"].values():
        assert auc is None or 0.0 <= auc <= 1.0
    shares = result["crop agreement"]["top 3"]
    assert result["refined classes"] >= result["true detections"]
    for value in shares.values():
        assert value is None or 0.0 <= value <= 1.0
