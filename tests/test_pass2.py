# ruff: noqa: F811 - `world` is the fixture imported from test_eval
"""Pass II as a measured mechanism: the paired bootstrap against a direct computation, the
per-image counts against the confusion matrices, the oracle diagnostic, the refinement
variants (confidence, erosion, gate, mix / blend / add, fit) and the fast path's equality to
the exact pass II where they must agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_eval import settings as eval_settings
from test_eval import world  # noqa: F401 - the same tiny checkpoint, bank and scenes

from dpseg.errors import UserError
from dpseg.metrics import (
    confusion_matrix,
    miou_from_counts,
    paired_bootstrap,
    predict_labels,
    predict_labels_pair,
    refined_labels,
    segmentation_scores,
)
from dpseg.model.prompts import VisualPrompts
from dpseg.refine import (
    RefineSettings,
    add_classes,
    class_mask,
    erode_mask,
    label_maps,
    merge_added,
    mixed_slots,
    refine_batch,
    replace_prompts,
    restrict_refinement,
    scatter_classes,
    select_classes,
    top_classes,
)
from pipeline.evaluate.loop import EvalSettings, evaluate, fast_pass2, head_counts, oracle_share, pass2_logits


# ---- the paired bootstrap ---------------------------------------------------------------------
def _random_images(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    confs_a, confs_b = [], []
    for _ in range(n):
        label = rng.integers(0, k, 200)
        label[rng.random(200) < 0.1] = 255
        pred_a = np.where(rng.random(200) < 0.6, label, rng.integers(0, k, 200)) % k
        pred_b = np.where(rng.random(200) < 0.7, label, rng.integers(0, k, 200)) % k
        confs_a.append(confusion_matrix(pred_a, label, k, 255))
        confs_b.append(confusion_matrix(pred_b, label, k, 255))
    return confs_a, confs_b


def _counts(confs):
    return (
        np.stack([np.diag(c) for c in confs]),
        np.stack([c.sum(0) for c in confs]),
        np.stack([c.sum(1) for c in confs]),
    )


def test_paired_bootstrap_equals_a_direct_resampling_of_confusion_matrices():
    confs_a, confs_b = _random_images(12, 5, seed=1)
    tp_a, pred_a, gt = _counts(confs_a)
    tp_b, pred_b, _ = _counts(confs_b)
    result = paired_bootstrap(tp_a, pred_a, tp_b, pred_b, gt, samples=200, seed=7)
    # direct: the same draws, each resample's confusion matrices summed and scored as the eval scores
    draws = np.random.default_rng(7).integers(0, 12, size=(200, 12))
    diffs = []
    for row in draws:
        a = segmentation_scores(sum(confs_a[i] for i in row))["miou"]
        b = segmentation_scores(sum(confs_b[i] for i in row))["miou"]
        diffs.append(b - a)
    assert result["ci95"] == pytest.approx([np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)], abs=1e-9)
    full = segmentation_scores(sum(confs_b))["miou"] - segmentation_scores(sum(confs_a))["miou"]
    assert result["estimate"] == pytest.approx(full, abs=1e-9)
    assert result["ci95"][0] <= result["estimate"] <= result["ci95"][1]
    # seeded: the same seed gives the same interval, another seed another one
    assert paired_bootstrap(tp_a, pred_a, tp_b, pred_b, gt, samples=200, seed=7) == result
    assert paired_bootstrap(tp_a, pred_a, tp_b, pred_b, gt, samples=200, seed=8)["ci95"] != result["ci95"]


def test_paired_bootstrap_of_identical_predictors_is_zero_and_a_hand_case():
    confs_a, _ = _random_images(6, 4, seed=2)
    tp, pred, gt = _counts(confs_a)
    same = paired_bootstrap(tp, pred, tp, pred, gt, samples=50, seed=0)
    assert same["ci95"] == [0.0, 0.0] and same["estimate"] == 0.0
    # one class, two images: a is right on image 0 only, b on both -> b - a is 100 - 50 on draws of
    # both images, 0 on draws of image 0 alone, 100 on draws of image 1 alone
    tp_a, pred_a = np.array([[10], [0]]), np.array([[10], [10]])
    tp_b, pred_b = np.array([[10], [10]]), np.array([[10], [10]])
    gt = np.array([[10], [10]])
    assert miou_from_counts(tp_a.sum(0), gt.sum(0), pred_a.sum(0)) == pytest.approx(100 * 10 / 30)
    r = paired_bootstrap(tp_a, pred_a, tp_b, pred_b, gt, samples=400, seed=3)
    assert r["ci95"][0] == pytest.approx(0.0) and r["ci95"][1] == pytest.approx(100.0)


# ---- refinement variants ----------------------------------------------------------------------
def test_erosion_matches_scipy_with_the_border_outside():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    mask = rng.random((20, 24)) < 0.7
    for k in (1, 2):
        expect = ndimage.binary_erosion(mask, np.ones((3, 3), bool), iterations=k, border_value=0)
        assert np.array_equal(erode_mask(torch.from_numpy(mask), k).numpy(), expect)


def test_confidence_margin_and_gate_thin_the_crop_mask():
    pred = torch.zeros(4, 4, dtype=torch.long)
    pred[:, 2:] = 1
    top1 = torch.tensor([[0.9, 0.9, 0.3, 0.3]] * 4)
    top2 = torch.tensor([[0.1, 0.85, 0.2, 0.2]] * 4)
    conf = torch.stack([top1, top2])
    base = dict(encode_size=32)
    assert class_mask(pred, 0, RefineSettings(**base), conf).sum() == 8
    assert class_mask(pred, 0, RefineSettings(**base, confidence=0.5), conf).sum() == 8
    assert class_mask(pred, 1, RefineSettings(**base, confidence=0.5), conf) is None  # nothing left
    only = class_mask(pred, 0, RefineSettings(**base, margin=0.5), conf)
    assert only[:, 0].all() and not only[:, 1].any()
    assert class_mask(pred, 1, RefineSettings(**base, gate=0.5), conf) is None
    assert class_mask(pred, 0, RefineSettings(**base, gate=0.5), conf) is not None
    with pytest.raises(UserError, match="confidence must be in"):
        RefineSettings(32, confidence=1.5)
    with pytest.raises(UserError, match="merge 'swap'"):
        RefineSettings(32, merge="swap")


def _prompts(n=3, m=4, d=5):
    g = torch.Generator().manual_seed(0)
    return VisualPrompts(torch.randn(n, m, d, generator=g), {4: torch.randn(n, m, 2, generator=g)})


def _ref(classes, d=5, seed=1):
    from dpseg.refine import Refinement

    g = torch.Generator().manual_seed(seed)
    c = len(classes)
    return Refinement(
        torch.tensor(classes),
        torch.full((c,), 10),
        torch.ones(c, dtype=torch.long),
        torch.randn(c, d, generator=g),
        {4: torch.randn(c, 2, generator=g)},
    )


def test_mix_blend_and_replace_merge_crop_and_bank_prompts():
    visual, ref = _prompts(), _ref([2])
    assert mixed_slots(4, 0.5).tolist() == [False, True, False, True]
    assert mixed_slots(80, 0.25).sum() == 20 and mixed_slots(4, 1.0).all()
    full = replace_prompts(visual, [ref])
    assert torch.equal(full.embedding[0, 2], ref.embedding[0].expand(4, 5))
    assert torch.equal(full.embedding[0, :2], visual.embedding[:2])
    assert torch.equal(replace_prompts(visual, [ref], "mix", 1.0).embedding, full.embedding)
    mix = replace_prompts(visual, [ref], "mix", 0.5)
    assert torch.equal(mix.embedding[0, 2, 1], ref.embedding[0]) and torch.equal(
        mix.embedding[0, 2, 0], visual.embedding[2, 0]
    )
    blend = replace_prompts(visual, [ref], "blend", 0.25)
    unit = torch.nn.functional.normalize
    expect = 0.75 * unit(visual.embedding[2], dim=-1) + 0.25 * unit(ref.embedding[0], dim=-1)
    assert torch.allclose(blend.embedding[0, 2], expect)
    assert torch.allclose(blend.pooled[4][0, 2], 0.75 * visual.pooled[4][2] + 0.25 * ref.pooled[4][0])


def test_add_appends_the_crop_copy_and_takes_the_max():
    visual, ref = _prompts(), _ref([0, 2])
    text = torch.randn(3, 4, 5)
    text2, visual2, owners = add_classes(text, visual, ref)
    assert visual2.embedding.shape == (1, 5, 4, 5) and text2.shape == (5, 4, 5) and owners.tolist() == [0, 2]
    assert torch.equal(visual2.embedding[0, 3], ref.embedding[0].expand(4, 5)) and torch.equal(text2[4], text[2])
    logits = torch.randn(1, 5, 2, 2)
    merged = merge_added(logits, owners, 3)
    assert torch.equal(merged[:, 1], logits[:, 1])
    assert torch.equal(merged[:, 0], torch.maximum(logits[:, 0], logits[:, 3]))
    assert torch.equal(merged[:, 2], torch.maximum(logits[:, 2], logits[:, 4]))


def test_top_k_selection_scatters_back_and_keeps_the_rest():
    logits = torch.randn(2, 6, 3, 3)
    index = top_classes(logits, 2)
    assert index.shape == (2, 2) and (index[:, 0] < index[:, 1]).all()
    assert torch.equal(top_classes(logits, 6), torch.arange(6).expand(2, 6))
    text, visual = torch.randn(6, 4, 5), _prompts(6)
    text_k, visual_k = select_classes(text, visual, index)
    assert torch.equal(text_k[1, 0], text[index[1, 0]]) and torch.equal(
        visual_k.embedding[0, 1], visual.embedding[index[0, 1]]
    )
    part = torch.randn(2, 2, 3, 3)
    out = scatter_classes(logits, index, part)
    for b in range(2):
        for j, c in enumerate(index[b].tolist()):
            assert torch.equal(out[b, c], part[b, j])
        rest = [c for c in range(6) if c not in index[b].tolist()]
        assert torch.equal(out[b, rest], logits[b, rest])


@pytest.fixture(scope="module")
def model():
    from dpseg.model import DPSegConfig, build_dpseg

    torch.manual_seed(0)
    return build_dpseg(DPSegConfig(encoder="tiny", templates=2), weights=None).eval()


def test_fit_encodes_large_crops_as_the_exact_path_and_small_ones_smaller(model):
    images = torch.rand(1, 3, 64, 64)
    pred = (torch.arange(64) * 2 // 64).view(1, 1, 64).expand(1, 64, 64).clone()  # two full-height bands
    exact = refine_batch(model, images, pred, RefineSettings(64, min_area=1))
    fit = refine_batch(model, images, pred, RefineSettings(64, min_area=1, fit=True))
    assert torch.equal(exact[0].embedding, fit[0].embedding)
    small = torch.full((1, 64, 64), 1)
    small[0, :10, :10] = 0
    exact, fit = (refine_batch(model, images, small, RefineSettings(64, min_area=1, fit=f)) for f in (False, True))
    # class 1 spans the image: the same crop at the same size, encoded in a batch of another size
    # (class 0's crop is encoded apart at 32 px), so equal up to float summation order
    torch.testing.assert_close(exact[0].embedding[1], fit[0].embedding[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(exact[0].embedding[0], fit[0].embedding[0])  # class 0 encoded at 32


def test_fast_pass_two_equals_the_exact_one_where_it_must(model):
    from dpseg.model.summary import random_prompts

    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 64)
    text, visual = random_prompts(model, 5)
    settings = EvalSettings(checkpoint="c", dataset="d")
    refine = RefineSettings(64, min_area=1)
    with torch.inference_mode():
        features = model.encode_image(model.image_encoder.normalize(images))
        logits1 = model(text=text, visual=visual, features=features)
        detect = torch.nn.functional.interpolate(logits1, size=(64, 64)).argmax(1)
        refs = refine_batch(model, images, detect, refine)
        exact = pass2_logits(model, text, visual, features, refs, refine, logits1, 0, settings)
        all_k = pass2_logits(model, text, visual, features, refs, refine, logits1, 5, settings)
        two = pass2_logits(model, text, visual, features, refs, refine, logits1, 2, settings)
    assert torch.equal(all_k, exact)  # k >= N: the exact pass II
    index = top_classes(logits1, 2)
    for b in range(2):
        rest = [c for c in range(5) if c not in index[b].tolist()]
        assert torch.equal(two[b, rest], logits1[b, rest])  # kept from pass I
    assert not torch.equal(two, exact)


def test_restricted_refinement_keeps_the_decoded_classes_renumbered_with_their_crops():
    from dpseg.refine import Refinement

    counts = torch.tensor([2, 1, 1])  # class 1 has two instance crops: rows 0-1, class 3 row 2, class 4 row 3
    rows = torch.arange(4, dtype=torch.float32)
    ref = Refinement(torch.tensor([1, 3, 4]), torch.tensor([9, 8, 7]), counts, rows.view(4, 1), {4: -rows.view(4, 1)})
    out = restrict_refinement(ref, torch.tensor([0, 3, 4]))
    assert out.classes.tolist() == [1, 2] and out.areas.tolist() == [8, 7] and out.counts.tolist() == [1, 1]
    assert out.embedding.flatten().tolist() == [2.0, 3.0] and out.pooled[4].flatten().tolist() == [-2.0, -3.0]
    kept_first = restrict_refinement(ref, torch.tensor([1, 2]))
    assert kept_first.classes.tolist() == [0] and kept_first.embedding.flatten().tolist() == [0.0, 1.0]
    assert restrict_refinement(ref, torch.tensor([0, 2, 5])).classes.numel() == 0


@pytest.mark.parametrize("merge, share, instances", [("replace", 1.0, 0), ("mix", 0.5, 2)])
def test_fast_pass_two_merges_only_the_decoded_classes_as_a_full_merge_would(model, merge, share, instances):
    from dpseg.model.summary import random_prompts

    torch.manual_seed(2)
    images = torch.rand(2, 3, 64, 64)
    text, visual = random_prompts(model, 6)
    refine = RefineSettings(64, min_area=1, merge=merge, share=share, instances=instances)
    detect = (torch.arange(64) * 6 // 64).view(1, 64, 1).expand(2, 64, 64).clone()  # six bands: all refined
    with torch.inference_mode():
        features = model.encode_image(model.image_encoder.normalize(images))
        logits1 = model(text=text, visual=visual, features=features)
        refs = refine_batch(model, images, detect, refine)
        index = top_classes(logits1, 3)
        part = fast_pass2(model, text, visual, features, refs, refine, index, None)
        # independently: every class merged, then the top classes' prompts gathered
        text_k, visual_k = select_classes(text, replace_prompts(visual, refs, merge, share), index)
        expected = model(text=text_k, visual=visual_k, features=features)
    assert torch.equal(part, expected)


def test_fast_pass_two_decodes_the_top_classes_in_the_context_of_all(model):
    """With nothing refined, the top classes decoded against pass I's attention summaries of all
    N classes give pass I's own logits back; attending among themselves only, they do not."""
    from dpseg.model import PassContext
    from dpseg.model.summary import random_prompts
    from dpseg.refine import Refinement

    torch.manual_seed(4)
    images = torch.rand(2, 3, 64, 64)
    text, visual = random_prompts(model, 7)
    refine = RefineSettings(64, min_area=1)
    empty = Refinement(
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, visual.embedding.shape[-1]),
        {s: torch.zeros(0, p.shape[-1]) for s, p in visual.pooled.items()},
    )
    with torch.inference_mode():
        features = model.encode_image(model.image_encoder.normalize(images))
        context = PassContext()
        logits1 = model(text=text, visual=visual, features=features, context_out=context)
        assert len(context.summaries) == len(context.skips) == model.decoder.num_stages
        index = top_classes(logits1, 3)
        expected = logits1.gather(1, index.view(2, 3, 1, 1).expand(-1, -1, *logits1.shape[-2:]))
        for chunk in (None, 2):
            part = fast_pass2(model, text, visual, features, [empty, empty], refine, index, chunk, context)
            torch.testing.assert_close(part, expected, rtol=1e-4, atol=1e-5)
        alone = fast_pass2(model, text, visual, features, [empty, empty], refine, index, None)
        assert not torch.allclose(alone, expected, rtol=1e-3, atol=1e-3)
        # a context recorded from the same decode changes nothing
        again = model(text=text, visual=visual, features=features, context=context)
        torch.testing.assert_close(again, logits1, rtol=1e-5, atol=1e-6)


def test_fast_pass_two_of_every_class_is_the_exact_pass_two(model):
    """Decoding all N classes again in pass I's context, less their own pass-I keys and values,
    is the exact pass II (chunked or not); against pass I's summary as it was, it is not."""
    from dpseg.model import PassContext
    from dpseg.model.summary import random_prompts

    torch.manual_seed(6)
    images = torch.rand(2, 3, 64, 64)
    text, visual = random_prompts(model, 6)
    refine = RefineSettings(64, min_area=1, merge="mix", share=0.5)
    detect = (torch.arange(64) * 6 // 64).view(1, 64, 1).expand(2, 64, 64).clone()  # six bands: all refined
    every = torch.arange(6).repeat(2, 1)  # all classes (ascending, as top_classes gives them)
    with torch.inference_mode():
        features = model.encode_image(model.image_encoder.normalize(images))
        context = PassContext()
        model(text=text, visual=visual, features=features, context_out=context)
        assert all(keys.shape[:2] == (2, 6) for keys, _, _ in context.class_states)
        refs = refine_batch(model, images, detect, refine)
        exact = model(text=text, visual=replace_prompts(visual, refs, "mix", 0.5), features=features)
        expected = exact.gather(1, every.view(2, 6, 1, 1).expand(-1, -1, *exact.shape[-2:]))
        for chunk in (None, 4):
            part = fast_pass2(model, text, visual, features, refs, refine, every, chunk, context)
            torch.testing.assert_close(part, expected, rtol=1e-4, atol=1e-5)
        text_k, visual_k = select_classes(text, replace_prompts(visual, refs, "mix", 0.5), every)
        stale = model(text=text_k, visual=visual_k, features=features, context=context)  # pass I's own states
        assert not torch.allclose(stale, expected, rtol=1e-3, atol=1e-3)


def test_a_context_takes_out_only_the_classes_early_rejection_kept():
    """Under early rejection a stage holds the keys of the kept classes only: taking out a class
    that was rejected there takes out nothing."""
    from dpseg.model import PassContext
    from dpseg.model.blocks import ClassAttention

    torch.manual_seed(7)
    keys, values = torch.rand(1, 3, 2, 2, 1, 4), torch.randn(1, 3, 2, 2, 1, 4)  # classes 0, 2, 5 of 6
    total = ClassAttention.summary_of(keys, values)
    context = PassContext([total], [None], [(keys, values, torch.tensor([0, 2, 5]))])
    ((kv, k_sum),) = context.without(torch.tensor([[2, 3]])).summaries  # class 2 kept, class 3 rejected
    left = ClassAttention.summary_of(keys[:, [0, 2]], values[:, [0, 2]])  # classes 0 and 5
    torch.testing.assert_close(kv, left[0])
    torch.testing.assert_close(k_sum, left[1])
    with pytest.raises(ValueError, match="holds no per-class keys"):
        PassContext([total], [None]).without(torch.tensor([[0]]))


def test_a_decode_under_early_rejection_records_which_classes_each_stage_kept():
    from dpseg.model import DPSegConfig, PassContext, build_dpseg
    from dpseg.model.summary import random_prompts

    torch.manual_seed(0)
    model = build_dpseg(DPSegConfig(encoder="tiny", templates=2, class_reject_topk=1), weights=None).eval()
    text, visual = random_prompts(model, 8)
    context = PassContext()
    with torch.inference_mode():
        model(images=torch.rand(1, 3, 64, 64), text=text, visual=visual, context_out=context)
    assert len(context.class_states) == model.decoder.num_stages
    assert any(kept is not None and kept.numel() < 8 for _, _, kept in context.class_states)
    for keys, _, kept in context.class_states:  # the aux head before each stage may drop classes
        assert keys.shape[1] == (8 if kept is None else kept.numel())


def test_pass_one_and_fast_pass_two_labels_share_one_upsampling():
    torch.manual_seed(3)
    logits1 = torch.randn(2, 9, 5, 6)
    logits1[:, 4] = logits1[:, 2]  # exact ties: the lower class wins, as in predict_labels
    index = top_classes(logits1, 3)
    part = torch.randn(2, 3, 5, 6)
    merged = scatter_classes(logits1, index, part)
    for chunk in (None, 4):
        labels1, labels2 = predict_labels_pair(logits1, index, part, (17, 19), chunk)
        assert labels1.shape == labels2.shape == (2, 17, 19)
        assert torch.equal(labels1, predict_labels(logits1, (17, 19), chunk))
        assert torch.equal(labels2, predict_labels(merged, (17, 19), chunk))


def test_fast_pass_two_reuses_pass_one_scores_with_the_labels_of_predicting_apart(world, monkeypatch):
    import pipeline.evaluate.loop as loop

    def per_image(out):
        return sorted(p.read_bytes() for p in (world / out / "per_image").iterdir())

    reused = []
    monkeypatch.setattr(loop, "refined_labels", lambda *a: reused.append(1) or refined_labels(*a))
    exact = evaluate(_settings(world, "topk-exact", bootstrap=0), progress=False)
    assert not reused
    shared = evaluate(_settings(world, "topk-shared", topk=4, bootstrap=0), progress=False)
    assert len(reused) == 4  # the scenes are labelled at the model's input size: pass I's scores reused
    monkeypatch.setattr(loop, "_labels_sized", lambda batch, size: False)  # labels predicted at their own size
    apart = evaluate(_settings(world, "topk-apart", topk=4, bootstrap=0), progress=False)
    assert exact["passes"]["1"] == shared["passes"]["1"] == apart["passes"]["1"]  # pass I never depends on pass II
    assert shared["passes"]["2"] == apart["passes"]["2"]
    assert per_image("topk-shared") == per_image("topk-apart")


# ---- the eval end to end: per-image counts, interval, oracle ------------------------------------
def _settings(world, out, **kw):
    return eval_settings(world, out, **kw)


@pytest.fixture(scope="module")
def oracle_run(world):
    return evaluate(_settings(world, "oracle", oracle=True, bootstrap=300, bootstrap_seed=5), progress=False)


def test_per_image_counts_sum_to_the_confusion_metrics_and_the_interval_is_reported(world, oracle_run):
    out = world / "oracle"
    counts = np.load(out / "per_image" / "counts.npy")
    info = json.loads((out / "per_image" / "ids.json").read_text())
    heads = ["1", "2", "oracle"]
    assert info["rows"] == ["gt", "tp_1", "tp_2", "tp_oracle", "pred_1", "pred_2", "pred_oracle"]
    assert info["ids"] == ["000000", "000001", "000002", "000003"] and counts.shape[:2] == (4, 7)
    for p in ("1", "2"):
        tp, gt, pred = head_counts(counts, heads, p)
        assert miou_from_counts(tp.sum(0), gt.sum(0), pred.sum(0)) == pytest.approx(oracle_run["passes"][p]["miou"])
    boot = oracle_run["paired_bootstrap"]
    assert boot["estimate"] == pytest.approx(oracle_run["pass2_minus_pass1_miou"])
    assert boot["samples"] == 300 and boot["seed"] == 5 and boot["images"] == 4
    tp1, gt, pred1 = head_counts(counts, heads, "1")
    tp2, _, pred2 = head_counts(counts, heads, "2")
    assert paired_bootstrap(tp1, pred1, tp2, pred2, gt, 300, 5)["ci95"] == boot["ci95"]


def test_the_oracle_is_a_labelled_diagnostic_never_a_pass(world, oracle_run):
    assert EvalSettings(checkpoint="c", dataset="d").oracle is False
    assert sorted(oracle_run["passes"]) == ["1", "2"]
    diag = oracle_run["diagnostics"]
    assert "DIAGNOSTIC" in diag["note"]
    one, two, bound = oracle_run["passes"]["1"]["miou"], oracle_run["passes"]["2"]["miou"], diag["pass2_oracle"]["miou"]
    assert diag["oracle_gain"] == pytest.approx(bound - one)
    assert diag["share_of_oracle_gain_closed"] == oracle_share(one, two, bound)

    # the oracle's crops are cut from the ground truth: every refined class is present there
    from pipeline.evaluate.report import render_report

    report = render_report([str(world / "oracle")], labels=["u"], out=str(world / "report"), panels=0)
    assert "diagnostic" in report["markdown"] and f"{bound:.1f}" in report["markdown"]


def test_the_share_of_the_oracle_gain_is_given_only_where_there_is_a_gain_to_close():
    assert oracle_share(10.0, 12.0, 20.0) == pytest.approx(0.2)
    assert oracle_share(10.0, 9.0, 14.0) == pytest.approx(-0.25)  # pass II lost a quarter of the oracle's gain
    assert oracle_share(10.0, 12.0, 10.5) is None  # the oracle gains half a point: nothing to close
    assert oracle_share(23.8, 21.0, 17.7) is None  # below pass I (a decoder that never met a crop prompt)


def test_oracle_crops_come_from_the_label_map():
    labels = torch.tensor([[[0, 0, 255, 2], [0, 0, 2, 2]]])
    maps = label_maps(labels, 3, 255, (2, 4))
    assert maps.tolist() == [[[0, 0, 3, 2], [0, 0, 2, 2]]]
    from dpseg.refine import detect

    ids, areas = detect(maps[0], 3, 1)
    assert ids.tolist() == [0, 2] and areas.tolist() == [4, 3]


def test_variant_settings_are_one_line_errors(world):
    with pytest.raises(UserError, match="--oracle is a pass-II diagnostic"):
        evaluate(_settings(world, "bad1", oracle=True, passes=1), progress=False)
    with pytest.raises(UserError, match="share must be in"):
        evaluate(_settings(world, "bad2", merge="mix", share=2.0), progress=False)
    with pytest.raises(UserError, match="--topk decodes a subset"):
        evaluate(_settings(world, "bad3", merge="add", topk=3), progress=False)


def test_variants_run_end_to_end_and_record_their_settings(world):
    m = evaluate(
        _settings(world, "variant", confidence=0.3, erode=1, gate=0.1, merge="mix", share=0.5, topk=4, bootstrap=50),
        progress=False,
    )
    r = m["settings"]["refinement"]
    assert (r["confidence"], r["erode"], r["gate"], r["merge"], r["share"], r["topk"]) == (0.3, 1, 0.1, "mix", 0.5, 4)
    added = evaluate(_settings(world, "added", merge="add", bootstrap=0), progress=False)
    assert "paired_bootstrap" not in added and added["passes"]["2"]["miou"] is not None


def test_the_pass_two_diagnosis_adds_up(world, oracle_run):
    from pipeline.analyze.pass2 import diagnose, markdown

    d = diagnose(world / "oracle")
    counts = np.load(world / "oracle" / "per_image" / "counts.npy")
    tp1, tp2 = counts[:, 1], counts[:, 2]
    present = counts[:, 0] > 0
    groups = d["groups"]
    # refined-true and present-not-refined pairs cover every present pair: their tp gains sum to the total
    covered = groups["refined, true detection"].get("tp_gained", 0) + groups["present, not refined"].get("tp_gained", 0)
    assert covered == int((tp2 - tp1)[present].sum())
    assert groups["refined, false detection"].get("gt_pixels", 0) == 0
    assert "crop-mask precision" in markdown([d])


# ---- the checkpoint decides how pass II merges --------------------------------------------------
def test_pass_two_merges_as_the_checkpoint_met_crop_prompts_in_training():
    from pipeline.evaluate.setup import checkpoint_facts, pass2_merge

    def facts(recipe):
        return checkpoint_facts({"encoder": {"name": "tiny"}, "encoder_weights": None, "extra": {"recipe": recipe}})

    assert pass2_merge(facts({"crop_prompts": 0.5})) == ("mix", 0.5)
    assert pass2_merge(facts({"crop_prompts": 0.0})) == ("replace", 1.0)
    assert pass2_merge(facts({})) == ("replace", 1.0)  # checkpoints from before the option: the paper's
    trained = ("mix", 0.25)

    def resolved(**kw):
        r = EvalSettings(checkpoint="c", dataset="d", **kw).refine_settings(64, trained)
        return r.merge, r.share

    assert resolved() == ("mix", 0.25)
    assert resolved(merge="mix") == ("mix", 0.25)
    assert resolved(merge="mix", share=0.75) == ("mix", 0.75)
    assert resolved(merge="replace") == ("replace", 1.0)
    assert resolved(merge="blend") == ("blend", 1.0)


def test_eval_and_segment_take_the_merge_from_a_crop_prompt_checkpoint(world):
    import shutil

    from pipeline.evaluate.session import SegmentSession

    crop_ckpt = world / "ckpt-crop"
    shutil.copytree(world / "ckpt", crop_ckpt)
    config = json.loads((crop_ckpt / "config.json").read_text())
    config["extra"]["recipe"]["crop_prompts"] = 0.5
    (crop_ckpt / "config.json").write_text(json.dumps(config))

    default = evaluate(_settings(world, "crop-default", checkpoint=str(crop_ckpt), bootstrap=0), progress=False)
    explicit = evaluate(_settings(world, "crop-explicit", merge="mix", share=0.5, bootstrap=0), progress=False)
    plain = evaluate(_settings(world, "plain-default", bootstrap=0), progress=False)
    r = default["settings"]["refinement"]
    assert (r["merge"], r["share"]) == ("mix", 0.5)
    assert plain["settings"]["refinement"]["merge"] == "replace"
    assert default["passes"]["2"]["miou"] == explicit["passes"]["2"]["miou"]
    assert default["passes"]["1"]["miou"] == plain["passes"]["1"]["miou"]
    session = SegmentSession(crop_ckpt, device="cpu")
    assert (session.merge, session.share) == ("mix", 0.5)
    assert (SegmentSession(world / "ckpt", device="cpu").merge) == "replace"


def test_the_diagnosis_scores_the_objects_without_the_background_class(tmp_path):
    from pipeline.analyze.pass2 import diagnose, markdown

    # 2 images x 3 classes (a, b, background); rows gt, tp_1, tp_2, pred_1, pred_2
    gt = np.array([[10, 0, 50], [0, 20, 40]])
    tp1, pred1 = np.array([[5, 0, 40], [0, 10, 30]]), np.array([[10, 5, 45], [5, 20, 35]])
    tp2, pred2 = np.array([[8, 0, 40], [0, 10, 30]]), np.array([[12, 0, 48], [0, 25, 35]])
    folder = tmp_path / "eval"
    (folder / "per_image").mkdir(parents=True)
    np.save(folder / "per_image" / "counts.npy", np.stack([gt, tp1, tp2, pred1, pred2], axis=1))
    (folder / "per_image" / "ids.json").write_text(
        json.dumps({"ids": ["0", "1"], "rows": ["gt", "tp_1", "tp_2", "pred_1", "pred_2"]})
    )
    (folder / "refinement.csv").write_text("image,class,area,gt_area,cropped,cropped_in_gt\n0,0,10,10,10,8\n")
    metrics = {"class_names": ["a", "b", "background"], "paired_bootstrap": {"samples": 200, "seed": 3}}
    (folder / "metrics.json").write_text(json.dumps(metrics))

    objects = diagnose(folder)["objects_only"]
    # a: I 5/(10+15-5)=0.25, II 8/(10+12-8)=8/14; b: I 10/(20+25-10)=10/35, II 10/(20+25-10)=10/35
    assert objects["classes"] == 2
    assert objects["pass1"] == pytest.approx(100 * (0.25 + 10 / 35) / 2)
    assert objects["pass2"] == pytest.approx(100 * (8 / 14 + 10 / 35) / 2)
    assert objects["change"] == pytest.approx(objects["pass2"] - objects["pass1"])
    assert "objects only" in markdown([diagnose(folder)])
    metrics["class_names"] = ["a", "b", "c"]  # no background class: nothing to leave out
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert diagnose(folder)["objects_only"] is None
