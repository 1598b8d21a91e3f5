"""Inference-side probes of pass II on one checkpoint: would merging the two passes' scores, or
refining only the classes whose crop looks like its class, make pass II pay? One sweep over a
dataset computes every variant from the same pass I, the same crops and the same pass II.

    python -m pipeline.analyze.fuse_verify CKPT DATASET --classes seen --bank out/bank [--limit N]

Variants (each scored as SED's protocol scores a pass: sigmoid, upsample, argmax):
- fused w: the probabilities (1 - w) sigmoid(pass I) + w sigmoid(pass II) (0: pass I, 1: pass II);
- verified top r: pass II refining only the classes whose crop's global embedding has its own
  class among the r nearest bank prototypes (the mean of the class's M unit embeddings);
- verified top 1, fused 0.5;
- pass I kept below g: pass II (every detected class refined), but the classes whose pass-I mean
  probability over their pixels is under g keep their pass-I logits;
- diagnostic, true detections only: pass II refining only the detected classes that the ground
  truth holds, with pass I's crops (what a perfect verifier would give; never a result);
- diagnostic, true detections the gate keeps: as above, less the true detections whose pass-I
  mean probability is under the gate KEEP_PASS1_BELOW (what a verifier with no false detections,
  and the gate's misses, would give);
- diagnostic, false detections at pass I: pass II with every detected class refined, then the
  false detections' logits replaced by their pass-I ones (is the loss in the false classes' own
  scores, or in what their crops do to the other classes?).
Crop agreement: per refined class, whether it is a true detection (its class is in the ground
truth) and the rank of its own class among the prototypes; the probe prints the share of true
and of false detections that each `top r` keeps. Detection scores: how well pass I's mean
probability over the class's pixels, its area, the crop's cosine to its own prototype and its
rank (lower is better) tell true from false detections (area under the ROC curve, 0.5: not at all),
and the share of each that `dpseg eval --gate g` would keep (mean probability >= g) for GATES.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

FUSE_WEIGHTS = (0.25, 0.5, 0.75)
VERIFY_TOPS = (1, 3)
TRUE_ONLY = "diagnostic: true detections only"
KEEP_PASS1_BELOW = 0.37
GATES = (0.37, 0.43)  # `dpseg eval --gate g` values whose kept shares the probe reports
KEPT = f"pass I kept below {KEEP_PASS1_BELOW}"
TRUE_GATED = f"diagnostic: true detections with pass I mean probability >= {KEEP_PASS1_BELOW}"
FALSE_AT_PASS1 = "diagnostic: false detections keep their pass-I logits"


def fuse_logits(logits1: torch.Tensor, logits2: torch.Tensor, weight: float) -> torch.Tensor:
    """Logits whose sigmoid is (1 - weight) sigmoid(logits1) + weight sigmoid(logits2)."""
    probs = (1 - weight) * torch.sigmoid(logits1.float()) + weight * torch.sigmoid(logits2.float())
    return torch.logit(probs.clamp(1e-6, 1 - 1e-6))


def keep_pass1_logits(logits1: torch.Tensor, logits2: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Pass II's logits (B, N, h, w), except the classes marked in `classes` (B, N) bool, which keep
    pass I's."""
    return torch.where(classes[:, :, None, None].to(logits1.device), logits1, logits2)


def separation_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for telling `positive` (bool) rows from the others:
    the chance that a random positive outscores a random negative, ties counting half."""
    from scipy.stats import rankdata

    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def kept_shares(kept: np.ndarray, true: np.ndarray) -> dict[str, float | None]:
    """The share of the true and of the false detections (`true`, bool) that a rule keeps (`kept`)."""
    return {
        "true detections kept": float(kept[true].mean()) if true.any() else None,
        "false detections kept": float(kept[~true].mean()) if (~true).any() else None,
    }


def crop_similarities(ref, prototypes: torch.Tensor) -> torch.Tensor:
    """(C, N): cosine of each refined class's (first) crop to every class prototype (N, D)."""
    first = torch.cumsum(ref.counts, 0) - ref.counts
    return F.normalize(ref.embedding[first].float(), dim=-1) @ prototypes.T.to(ref.embedding.device)


def own_class_rank(similarities: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(C,) from `crop_similarities`: how many prototypes are more similar to each crop than its
    own class's (0: its own class is the nearest)."""
    own = similarities.gather(1, classes.view(-1, 1).to(similarities.device))
    return (similarities > own).sum(dim=1).cpu()


def probe(checkpoint: str, dataset: str, classes: str | None, bank: str | None, limit: int | None = None) -> dict:
    from tqdm.auto import tqdm

    from dpseg.metrics import confusion_matrix, predict_labels, segmentation_scores
    from dpseg.refine import keep_refined, pass1_confidence, refine_batch
    from dpseg.reproducibility import deterministic
    from pipeline.evaluate.loop import EvalSettings, _label_maps, pass2_logits
    from pipeline.evaluate.setup import prepare_context

    # 1. the evaluation's own context: checkpoint, bank, class subset, prompts, pass-II settings
    settings = EvalSettings(
        checkpoint=checkpoint, dataset=dataset, classes=classes, bank=bank, batch_size=8, num_workers=0, device="cpu"
    )
    settings.validate()
    deterministic()
    ctx = prepare_context(settings)
    refine = settings.refine_settings(ctx.encode_size, ctx.pass2_merge)
    model, text, visual, k = ctx.model, ctx.text, ctx.visual, len(ctx.keep)
    prototypes = visual.prototypes()
    heads = ["pass 1", "pass 2", *[f"fused {w}" for w in FUSE_WEIGHTS]]
    heads += [f"verified top {r}" for r in VERIFY_TOPS] + ["verified top 1, fused 0.5", KEPT]
    heads += [TRUE_ONLY, TRUE_GATED, FALSE_AT_PASS1]
    conf = {h: np.zeros((k, k), np.int64) for h in heads}
    agreement: list[tuple[bool, int]] = []
    detection_scores: list[tuple[float, float, float]] = []  # per refined class: mean probability, area, cosine
    indices = list(range(len(ctx.dataset)))[:limit]
    batches = [indices[i : i + 8] for i in range(0, len(indices), 8)]
    for batch in tqdm(ctx.loader(batches, 0), total=len(batches), desc="pass-II probe", unit="batch"):
        images01 = batch["image"].float().div_(255)
        size = tuple(images01.shape[-2:])
        with torch.inference_mode():
            # 2. pass I, the crops, pass II: as `dpseg eval` computes them
            features = model.encode_image(model.image_encoder.normalize(images01))
            logits1 = model(text=text, visual=visual, features=features)
            detect_maps = predict_labels(logits1, size)
            refs = refine_batch(model, images01, detect_maps, refine)
            top1 = pass1_confidence(logits1, size)[:, 0]
            logits2 = pass2_logits(model, text, visual, features, refs, refine, logits1, 0, settings)
            # 3. crop agreement per refined class, and pass II on the agreeing classes only
            truth = _label_maps(batch["label"], ctx, size)
            similarities = [crop_similarities(r, prototypes) for r in refs]
            ranks = [own_class_rank(sims, r.classes) for sims, r in zip(similarities, refs, strict=True)]
            true_refs, true_gated_refs = [], []
            unsure = torch.zeros(logits1.shape[:2], dtype=torch.bool)
            false = torch.zeros(logits1.shape[:2], dtype=torch.bool)
            for j, (ref, rank) in enumerate(zip(refs, ranks, strict=True)):
                present = set(truth[j].unique().tolist())
                is_true = torch.tensor([c in present for c in ref.classes.tolist()], dtype=torch.bool)
                agreement += [(bool(t), int(x)) for t, x in zip(is_true.tolist(), rank.tolist(), strict=True)]
                mean_probability = torch.tensor(
                    [float(top1[j][detect_maps[j] == c].mean()) for c in ref.classes.tolist()], dtype=torch.float64
                ).reshape(-1)
                true_refs.append(keep_refined(ref, is_true))
                true_gated_refs.append(keep_refined(ref, is_true & (mean_probability >= KEEP_PASS1_BELOW)))
                unsure[j, ref.classes[mean_probability < KEEP_PASS1_BELOW]] = True
                false[j, ref.classes[~is_true]] = True
                cosine = similarities[j]
                for i, (c, area) in enumerate(zip(ref.classes.tolist(), ref.areas.tolist(), strict=True)):
                    detection_scores.append((float(mean_probability[i]), float(area), float(cosine[i, c])))
            out = {"pass 1": logits1, "pass 2": logits2}
            out.update({f"fused {w}": fuse_logits(logits1, logits2, w) for w in FUSE_WEIGHTS})
            for top in VERIFY_TOPS:
                kept = [keep_refined(r, x < top) for r, x in zip(refs, ranks, strict=True)]
                out[f"verified top {top}"] = pass2_logits(
                    model, text, visual, features, kept, refine, logits1, 0, settings
                )
            out["verified top 1, fused 0.5"] = fuse_logits(logits1, out["verified top 1"], 0.5)
            out[KEPT] = keep_pass1_logits(logits1, logits2, unsure)
            out[TRUE_ONLY] = pass2_logits(model, text, visual, features, true_refs, refine, logits1, 0, settings)
            out[TRUE_GATED] = pass2_logits(model, text, visual, features, true_gated_refs, refine, logits1, 0, settings)
            out[FALSE_AT_PASS1] = keep_pass1_logits(logits1, logits2, false)
        # 4. SED's protocol per image
        for j, label in enumerate(batch["label"]):
            label = ctx.remap(label)
            for h in heads:
                pred = predict_labels(out[h][j : j + 1], label.shape)[0]
                conf[h] += confusion_matrix(pred, label, k, ctx.dataset.ignore_index)
    true = np.array([t for t, _ in agreement], dtype=bool)
    rank = np.array([r for _, r in agreement], dtype=np.int64)
    keeps = {f"top {top}": kept_shares(rank < top, true) for top in VERIFY_TOPS}
    columns = np.array(detection_scores, dtype=np.float64).reshape(-1, 3)
    separation = {
        name: separation_auc(values, true)
        for name, values in [
            ("pass I mean probability", columns[:, 0]),
            ("area", columns[:, 1]),
            ("crop cosine to own prototype", columns[:, 2]),
            ("crop rank of own prototype (negated)", -rank.astype(np.float64)),
        ]
    }
    gates = {f"gate {g}": kept_shares(columns[:, 0] >= g, true) for g in GATES}
    return {
        "checkpoint": checkpoint,
        "dataset": dataset,
        "classes": classes,
        "images": len(indices),
        "refinement": refine.to_dict(),
        "miou": {h: segmentation_scores(conf[h])["miou"] for h in heads},
        "refined classes": len(agreement),
        "true detections": int(true.sum()),
        "crop agreement": keeps,
        "true/false detection AUC": separation,
        "pass I mean probability gates": gates,
    }


def main(argv: list[str] | None = None) -> None:
    from dpseg.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("dataset")
    parser.add_argument("--classes", default=None)
    parser.add_argument("--bank", default=None)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        result = probe(args.checkpoint, args.dataset, args.classes, args.bank, args.limit)
    except UserError as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
