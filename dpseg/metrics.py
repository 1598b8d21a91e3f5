"""Semantic-segmentation metrics from a confusion matrix (SED's protocol).

    conf = confusion_matrix(pred, label, num_classes, ignore_index)   # (N, N) int64, rows = truth
    scores = segmentation_scores(conf)     # miou, fwiou, pacc, macc, per-class iou/acc

mIoU and mean accuracy average over the classes that occur in the ground truth (a class that
is never labelled has no IoU, even if it was predicted: its false positives still lower the
IoU of the classes they were taken from).
"""

from __future__ import annotations

import numpy as np
import torch

from dpseg.precision import fp32


def confusion_matrix(pred, label, num_classes: int, ignore_index: int) -> np.ndarray:
    """(N, N) int64 counts, row = ground truth, column = prediction; pixels labelled
    `ignore_index` are skipped. `pred` and `label` are same-shaped tensors or arrays of ids in
    0..N-1 (callers check labels first: see `label_range_error`)."""
    pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).reshape(-1).long()
    label = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label).reshape(-1).long()
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels, label {label.numel()}")
    keep = label != ignore_index
    index = label[keep] * num_classes + pred[keep].to(label.device)
    counts = torch.bincount(index.cpu(), minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).numpy().astype(np.int64)


def label_range_error(label, num_classes: int, ignore_index: int) -> list[int]:
    """Label values that are neither class ids nor the ignore value (at most 5), [] when fine."""
    values = torch.unique(torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label))
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    return [int(v) for v in bad[:5]]


def segmentation_scores(conf: np.ndarray) -> dict:
    """Scores in percent (as papers report them); per-class entries are None for classes
    without ground truth."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(axis=1)  # pixels labelled c
    pred = conf.sum(axis=0)  # pixels predicted c
    present = gt > 0
    union = gt + pred - tp
    iou = np.full(len(tp), np.nan)
    acc = np.full(len(tp), np.nan)
    iou[present] = tp[present] / union[present]
    acc[present] = tp[present] / gt[present]
    total = gt.sum()
    weights = gt / total if total else np.zeros_like(gt)

    def mean(values: np.ndarray) -> float | None:
        return float(100 * values[present].mean()) if present.any() else None

    def listed(values: np.ndarray) -> list[float | None]:
        return [None if np.isnan(v) else float(100 * v) for v in values]

    return {
        "miou": mean(iou),
        "fwiou": float(100 * np.sum(weights[present] * iou[present])) if present.any() else None,
        "pacc": float(100 * tp.sum() / total) if total else None,
        "macc": mean(acc),
        "classes_present": int(present.sum()),
        "pixels": int(total),
        "per_class_iou": listed(iou),
        "per_class_acc": listed(acc),
    }


def uniform_random_miou(gt_pixels) -> float | None:
    """Expected mIoU (percent, over present classes) of a predictor that picks one of the N
    classes uniformly at random per pixel, given the ground truth's pixel count per class.
    With p_c the share of class c: E[tp] = n_c/N, E[predicted c] = T/N, so in the large-pixel
    limit IoU_c = p_c / (N p_c + 1 - p_c). The chance level a trained model must beat."""
    counts = np.asarray(gt_pixels, dtype=np.float64)
    total, n = counts.sum(), len(counts)
    if total == 0:
        return None
    p = counts / total
    present = counts > 0
    iou = p[present] / (n * p[present] + 1 - p[present])
    return float(100 * iou.mean())


def predict_labels(logits: torch.Tensor, size: tuple[int, int], class_chunk: int | None = None) -> torch.Tensor:
    """SED's post-processing: sigmoid, bilinear upsampling to `size`, argmax over classes.
    (B, N, h, w) logits -> (B, H, W) int64. With `class_chunk` the upsampled scores of at most
    that many classes exist at once (a running max: the same labels, first index on ties)."""
    with fp32(logits):  # the sigmoid and the upsampling in fp32 whatever the caller's autocast
        return _predict_labels(logits, size, class_chunk)


def _predict_labels(logits: torch.Tensor, size: tuple[int, int], class_chunk: int | None) -> torch.Tensor:
    n = logits.shape[1]
    chunk = class_chunk or n
    best_val = best_idx = None
    for start in range(0, n, chunk):
        up = _upsampled_scores(logits[:, start : start + chunk], size)
        idx = up.argmax(dim=1, keepdim=True)
        val = up.gather(1, idx).squeeze(1)
        idx = idx.squeeze(1) + start
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    return best_idx


def predict_labels_pair(
    logits1: torch.Tensor,
    index: torch.Tensor,
    part: torch.Tensor,
    size: tuple[int, int],
    class_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass I's labels and fast pass II's: pass II's logits are pass I's with the classes `index`
    (B, k) replaced by `part` (B, k, h, w). Pass I's labels are `predict_labels(logits1)`'s, bit
    for bit; pass II's come from `refined_labels` (the other classes upsampled once for both).
    With a `class_chunk` below N the two are predicted separately, so memory stays bounded."""
    if class_chunk and class_chunk < logits1.shape[1]:
        from dpseg.refine import scatter_classes

        merged = scatter_classes(logits1, index, part)
        return predict_labels(logits1, size, class_chunk), predict_labels(merged, size, class_chunk)
    labels1, scores = scored_labels(logits1, size)
    return labels1, refined_labels(scores, labels1, index, part)


def scored_labels(logits: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`predict_labels(logits, size)` (bit for bit) and the upsampled scores (B, N, H, W) fp32 it
    took the argmax of, which `refined_labels` reuses."""
    with fp32(logits), torch.no_grad():
        scores = _upsampled_scores(logits, size)
        return scores.argmax(dim=1), scores


def refined_labels(
    scores1: torch.Tensor, labels1: torch.Tensor, index: torch.Tensor, part: torch.Tensor
) -> torch.Tensor:
    """Fast pass II's labels (B, H, W) from pass I's labels and upsampled scores (`scored_labels`;
    the scores are overwritten), with the classes `index` (B, k, ascending) rescored from their
    pass-II logits `part` (B, k, h, w): only k classes are upsampled, and the other classes' best
    class is looked up only where pass I's winner was one of the k. Equal to `predict_labels` of
    the merged logits up to the last bit of a sigmoid at a tie."""
    with fp32(part), torch.inference_mode():  # scores made under inference mode stay writable
        top = index.to(scores1.device)
        new = _upsampled_scores(part, tuple(scores1.shape[-2:]))
        top_val, top_pos = new.max(dim=1)  # the first of equal maxima: the lowest class (index ascends)
        top_idx = top.gather(1, top_pos.flatten(1)).view_as(top_pos)
        is_top = torch.zeros(scores1.shape[:2], dtype=torch.bool, device=scores1.device).scatter_(1, top, True)
        for b in range(scores1.shape[0]):  # only the k channels are written
            scores1[b].index_fill_(0, top[b], float("-inf"))
        rest_val = scores1.amax(dim=1)  # the other classes' best score (a value: cheap)
        # which of them: pass I's winner where it was not a top class; looked up where it was
        labels = torch.where(top_val > rest_val, top_idx, labels1)
        lookup = (top_val <= rest_val) & is_top.gather(1, labels1.flatten(1)).view_as(labels1)
        lookup |= top_val == rest_val
        if bool(lookup.any()):
            rest_idx = scores1.permute(0, 2, 3, 1)[lookup].argmax(dim=1)
            tie = (top_val == rest_val)[lookup]
            labels[lookup] = torch.where(tie, torch.minimum(rest_idx, top_idx[lookup]), rest_idx)
        return labels


def _upsampled_scores(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    probs = torch.sigmoid(logits.float())
    return torch.nn.functional.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)


def miou_from_counts(tp: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """mIoU (percent) over the classes present, from summed counts (..., K) -> (...); the same
    numbers `segmentation_scores` gives from the confusion matrix the counts were taken from.
    NaN where no class is present."""
    tp, gt, pred = (np.asarray(a, dtype=np.float64) for a in (tp, gt, pred))
    present = gt > 0
    union = gt + pred - tp
    iou = np.where(present, tp / np.where(present, union, 1.0), 0.0)
    count = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, 100 * iou.sum(axis=-1) / count, np.nan)


def paired_bootstrap(
    tp_a: np.ndarray,
    pred_a: np.ndarray,
    tp_b: np.ndarray,
    pred_b: np.ndarray,
    gt: np.ndarray,
    samples: int = 1000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of mIoU(b) - mIoU(a) over images: per-image counts (images, K) of true
    positives and predicted pixels of the two predictors and the ground-truth pixels. Each
    resample draws the images with replacement (`np.random.default_rng(seed).integers(0, n,
    (samples, n))`), sums their counts per class and scores both predictors on the same draw;
    the 95% interval is the percentile interval of the differences. A resample in which no class
    is present has no mIoU: it is left out and counted (`undefined`)."""
    n = len(gt)
    if n == 0:
        raise ValueError("no images to resample")
    draws = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    weights = np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)  # (S, n)
    gt_s = weights @ gt
    a = miou_from_counts(weights @ tp_a, gt_s, weights @ pred_a)
    b = miou_from_counts(weights @ tp_b, gt_s, weights @ pred_b)
    diff = b - a
    estimate = float(
        miou_from_counts(tp_b.sum(0), gt.sum(0), pred_b.sum(0))
        - miou_from_counts(tp_a.sum(0), gt.sum(0), pred_a.sum(0))
    )
    defined = ~np.isnan(diff)

    def interval(values: np.ndarray) -> list[float] | None:
        v = values[defined]
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v.size else None

    return {
        "estimate": None if np.isnan(estimate) else estimate,
        "ci95": interval(diff),
        "a_ci95": interval(a),
        "b_ci95": interval(b),
        "share_b_above_a": float(np.mean(diff[defined] > 0)) if defined.any() else None,
        "samples": int(samples),
        "undefined": int((~defined).sum()),
        "seed": int(seed),
        "images": int(n),
    }
