"""Pass II's diagnosis from one eval folder (no recomputation): what the refined classes gain
and lose, split by whether pass I's detection was true, and how good the cropped masks are.

    python -m pipeline.analyze.pass2 out/eval/seen [out/eval/unseen ...]     # markdown tables

Reads OUT/per_image (per image and class: ground-truth, true-positive and predicted pixels of
each pass) and OUT/refinement.csv (per image and refined class: pass-I area, ground-truth area
at the model input, cropped pixels and cropped pixels inside the ground truth).
- true detection: the refined class has ground-truth pixels in that image; false: none.
- per group, summed over (image, class) pairs: true-positive pixels gained (tp II - tp I) and
  false-positive pixels added ((pred - tp) II - (pred - tp) I); "not refined" are the pairs of
  classes present in an image that pass II did not refine (they change through the decoder's
  class attention and through the refined classes taking or giving up their pixels).
- objects only: where the set's vocabulary holds `background` (the demo's unseen set holds its
  canvas), pass I and II mIoU over the other classes with the same paired bootstrap; the canvas
  pixels still count as their false positives.
- crop quality: precision = cropped pixels inside the ground truth / cropped pixels, recall =
  cropped pixels inside the ground truth / ground-truth pixels (true detections; model input).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from dpseg.errors import UserError
from dpseg.metrics import miou_from_counts, paired_bootstrap


def diagnose(folder: str | Path) -> dict:
    folder = Path(folder)
    info_path, counts_path = folder / "per_image" / "ids.json", folder / "per_image" / "counts.npy"
    if not info_path.is_file() or not (folder / "refinement.csv").is_file():
        raise UserError(f"{folder} holds no per_image/ or refinement.csv; evaluate it with --passes 2 first")
    info = json.loads(info_path.read_text())
    counts = np.load(counts_path, allow_pickle=False)
    rows = info["rows"]
    row = {name: counts[:, rows.index(name)] for name in ("gt", "tp_1", "tp_2", "pred_1", "pred_2")}
    index = {image_id: i for i, image_id in enumerate(info["ids"])}
    refined = np.zeros(counts.shape[0:1] + counts.shape[2:], dtype=bool)
    groups: dict[str, list] = {"true": [], "false": []}
    with (folder / "refinement.csv").open() as f:
        for r in csv.DictReader(f):
            i, c = index[r["image"]], int(r["class"])
            refined[i, c] = True
            groups["true" if int(r["gt_area"]) > 0 else "false"].append((i, c, r))
    fp1, fp2 = row["pred_1"] - row["tp_1"], row["pred_2"] - row["tp_2"]
    out: dict = {"folder": str(folder), "images": int(counts.shape[0]), "groups": {}}

    def summary(pairs: list[tuple[int, int]]) -> dict:
        if not pairs:
            return {"pairs": 0}
        ii, cc = np.asarray(pairs).T
        return {
            "pairs": len(pairs),
            "tp_gained": int((row["tp_2"][ii, cc] - row["tp_1"][ii, cc]).sum()),
            "fp_added": int((fp2[ii, cc] - fp1[ii, cc]).sum()),
            "gt_pixels": int(row["gt"][ii, cc].sum()),
        }

    for name, items in groups.items():
        out["groups"][f"refined, {name} detection"] = summary([(i, c) for i, c, _ in items])
    present = np.argwhere((row["gt"] > 0) & ~refined)
    out["groups"]["present, not refined"] = summary([tuple(p) for p in present])
    true_rows = [r for _, _, r in groups["true"]]
    cropped = sum(int(r["cropped"]) for r in true_rows)
    hit = sum(int(r["cropped_in_gt"]) for r in true_rows)
    gt = sum(int(r["gt_area"]) for r in true_rows)
    total = len(groups["true"]) + len(groups["false"])
    out["crops"] = {
        "refined_per_image": total / max(counts.shape[0], 1),
        "false_detection_share": len(groups["false"]) / total if total else None,
        "mask_precision": hit / cropped if cropped else None,
        "mask_recall": hit / gt if gt else None,
    }
    out["objects_only"] = objects_only(folder, row)
    return out


def objects_only(folder: Path, row: dict) -> dict | None:
    """Pass I, pass II and the paired bootstrap of their change over the classes other than
    `background`, from the eval's own per-image counts and bootstrap settings; None when the
    set has no `background` class."""
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    names = metrics.get("class_names") or []
    keep = [k for k, name in enumerate(names) if name != "background"]
    if len(keep) == len(names) or not keep:
        return None
    tp1, tp2, pred1, pred2, gt = (row[k][:, keep] for k in ("tp_1", "tp_2", "pred_1", "pred_2", "gt"))
    settings = metrics.get("paired_bootstrap", {})
    boot = paired_bootstrap(tp1, pred1, tp2, pred2, gt, settings.get("samples", 1000), settings.get("seed", 0))
    return {
        "classes": len(keep),
        "pass1": float(miou_from_counts(tp1.sum(0), gt.sum(0), pred1.sum(0))),
        "pass2": float(miou_from_counts(tp2.sum(0), gt.sum(0), pred2.sum(0))),
        "change": boot["estimate"],
        "ci95": boot["ci95"],
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| eval | group | (image, class) pairs | tp pixels gained | fp pixels added | gt pixels |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for group, g in r["groups"].items():
            cells = [g.get(k, 0) for k in ("pairs", "tp_gained", "fp_added", "gt_pixels")]
            lines.append(f"| {r['folder']} | {group} | " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "| eval | refined classes / image | false detections | crop-mask precision | crop-mask recall |",
        "|---|---|---|---|---|",
    ]

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}%"

    for r in results:
        c = r["crops"]
        lines.append(
            f"| {r['folder']} | {c['refined_per_image']:.2f} | {pct(c['false_detection_share'])} | "
            f"{pct(c['mask_precision'])} | {pct(c['mask_recall'])} |"
        )
    objects = [r for r in results if r.get("objects_only")]
    if objects:
        lines += [
            "",
            "| eval | objects only (no background): classes | pass I | pass II | II − I [95% CI] |",
            "|---|---|---|---|---|",
        ]
        for r in objects:
            o = r["objects_only"]
            ci = "–" if o["ci95"] is None else f"[{o['ci95'][0]:+.1f}, {o['ci95'][1]:+.1f}]"
            lines.append(
                f"| {r['folder']} | {o['classes']} | {o['pass1']:.1f} | {o['pass2']:.1f} | {o['change']:+.1f} {ci} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        print(markdown([diagnose(f) for f in sys.argv[1:]]))
    except UserError as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
