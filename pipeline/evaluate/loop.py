"""Stage three: two-pass evaluation (SED's protocol + DPSeg's prompt refinement).

    metrics = evaluate(EvalSettings(checkpoint="out/train/checkpoint", dataset="data/shapes", out="out/eval"))

OUT/metrics.json      per pass: mIoU (classes present in the ground truth), fwIoU, pAcc, mAcc,
                      per-class IoU, images, uniform-random mIoU; the resolved settings
OUT/per_class.csv     one row per evaluated class
OUT/pred/pass{1,2}/<id>.png   with save_predictions (true: every image; N: the first N): dataset label ids
                              (uint8, uint16 above 255 classes)
OUT/overlays/overlay-%06d.tar refined prompts per image (bank/overlays.py)
OUT/per_image/       counts.npy (images, rows, classes) int64 and ids.json: per image and class the
                      ground-truth, true-positive and predicted pixels of each pass (what the paired
                      bootstrap resamples; keyed by image id, so ranks' lists merge)
OUT/refinement.csv    one row per image and refined class: area, ground-truth area, crop-mask precision
                      and recall against the ground truth (pass II diagnosis)
OUT/.parts/           per-shard confusion matrices: a killed run resumes at the first unfinished shard

The images are processed in shards of `shard_size`; a shard is done when its confusion part is
written (after its overlay shard and predictions), so a rerun skips done shards. Under
`accelerate launch` the shards not yet done are dealt round-robin over the ranks; every rank
writes its own shards' parts, overlays and predictions under the names one process would use,
and the main rank sums the parts once at the end (OUT must be one shared folder).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpseg.errors import UserError
from dpseg.io import LOCK_FILE, atomic_write_bytes, atomic_write_json
from dpseg.metrics import (
    confusion_matrix,
    label_range_error,
    paired_bootstrap,
    predict_labels,
    predict_labels_pair,
    refined_labels,
    scored_labels,
    segmentation_scores,
    uniform_random_miou,
)
from dpseg.model.decoder import PassContext
from dpseg.refine import (
    CROP_MODES,
    DEFAULT_MIN_AREA,
    PAPER_MERGE,
    RefineSettings,
    add_classes,
    class_mask,
    label_maps,
    merge_added,
    pass1_confidence,
    refine_batch,
    replace_prompts,
    restrict_refinement,
    scatter_classes,
    select_classes,
    top_classes,
)
from dpseg.reproducibility import environment
from pipeline.evaluate.setup import EvalContext, prepare_context

FORMAT = "dpseg-eval-1"
PARTS = ".parts"
EVAL_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalSettings:
    checkpoint: str
    dataset: str
    out: str = "out/eval"
    split: str = "val"
    bank: str | None = None  # default: the bank the checkpoint was trained with
    passes: int = 2
    classes: str | None = None  # None/'all', a declared subset ('seen', 'unseen') or ids '0,3,7'
    size: int | None = None  # model input (default: the checkpoint's training size, else the encoder's)
    encode_size: int | None = None  # prompt encode size (default: the checkpoint's / bank's)
    min_area: int = DEFAULT_MIN_AREA
    crop: str = "masked"
    instances: int = 0
    # pass-II variants (dpseg/refine.py; the defaults are the paper's reading)
    confidence: float = 0.0  # crop only pixels with pass-I probability >= this
    margin: float = 0.0  # ... and top-1 minus top-2 probability >= this
    erode: int = 0  # pixels each class mask shrinks by before cropping
    gate: float = 0.0  # refine a class only if its mean pass-I probability reaches this
    merge: str | None = None  # replace | mix | blend | add (None: the checkpoint's, pass2_merge)
    share: float | None = None  # mix: share of the M slots given to crops; blend: the crops' weight
    fit: bool = False  # encode each crop at the smallest multiple of 32 holding it (speed)
    topk: int = 0  # fast pass II: decode each image's k best pass-I classes only, the rest kept (0: exact)
    # diagnostics and statistics
    oracle: bool = False  # also run pass II with crops cut from the ground truth (a diagnostic bound)
    bootstrap: int = 1000  # paired bootstrap resamples of images for the pass II - pass I interval (0: off)
    bootstrap_seed: int = 0
    batch_size: int = 4
    num_workers: int = 2
    class_chunk: int | None = None
    save_predictions: bool | int = False  # True: every image; N: the first N images (report panels)
    overlays: str | None = None  # run pass II from these stored overlays (no pass I)
    write_overlays: bool = True
    shard_size: int = 64
    limit: int | None = None  # evaluate the first N images only
    device: str = "auto"
    text_cache: str | None = None
    encoder_weights: str | None = None  # default: the checkpoint's (carried in it, or recorded)
    precision: str = "fp32"  # fp32 (SED's) | bf16 | fp16: autocast of the network (cost volumes stay fp32)

    def validate(self) -> None:
        if self.passes not in (1, 2):
            raise UserError(f"passes must be 1 or 2, got {self.passes}")
        if self.crop not in CROP_MODES:
            raise UserError(f"crop {self.crop!r} is not one of {', '.join(CROP_MODES)}")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not isinstance(self.save_predictions, bool) and (
            not isinstance(self.save_predictions, int) or self.save_predictions < 0
        ):
            raise UserError(f"save_predictions must be true, false or a count >= 0, got {self.save_predictions!r}")
        for name in ("min_area", "instances", "num_workers", "erode", "topk", "bootstrap"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.size is not None and (self.size < 32 or self.size % 32):
            raise UserError(f"size must be a positive multiple of 32 (the encoder's stride), got {self.size}")
        if self.precision not in EVAL_PRECISIONS:
            raise UserError(f"precision {self.precision!r} is not one of {', '.join(EVAL_PRECISIONS)}")
        if self.overlays is not None and self.passes != 2:
            raise UserError("--overlays gives pass II's prompts: use it with --passes 2")
        if self.oracle and (self.passes != 2 or self.overlays is not None):
            raise UserError("--oracle is a pass-II diagnostic: use it with --passes 2 and without --overlays")
        if self.topk and self.merge == "add":
            raise UserError("--topk decodes a subset of the classes; --merge add appends classes: use one of them")
        self.refine_settings(64)  # one-line errors for the refinement settings

    def refine_settings(self, encode_size: int, checkpoint_merge: tuple[str, float] = PAPER_MERGE):
        """The refinement to run: merge and share unset take the checkpoint's (`pass2_merge`); a
        merge given without a share gets the checkpoint's share if it is the checkpoint's merge, else 1."""
        merge = self.merge or checkpoint_merge[0]
        share = self.share
        if share is None:
            share = checkpoint_merge[1] if merge == checkpoint_merge[0] else 1.0
        return RefineSettings(
            encode_size,
            self.min_area,
            self.crop,
            self.instances,
            confidence=self.confidence,
            margin=self.margin,
            erode=self.erode,
            gate=self.gate,
            merge=merge,
            share=share,
            fit=self.fit,
        )


def eval_from_params(section: dict, progress: bool = True) -> dict:
    """`evaluate` from a params.yaml `eval:` section (keys = EvalSettings fields)."""
    known = {f.name for f in fields(EvalSettings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise UserError(f"params eval section has unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = [k for k in ("checkpoint", "dataset") if k not in section]
    if missing:
        raise UserError(f"params eval section needs {', '.join(missing)}")
    return evaluate(EvalSettings(**section), progress=progress)


def evaluate(settings: EvalSettings, progress: bool = True) -> dict:
    """Under the lock of the output folder (one evaluation writes into it at a time; under
    `accelerate launch` the main rank holds it for the launch)."""
    from dpseg.io import folder_lock

    settings.validate()
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    with folder_lock(out, "dpseg eval", hold=os.environ.get("RANK", "0") == "0"):
        return _evaluate(settings, progress)


def _evaluate(settings: EvalSettings, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from dpseg.reproducibility import deterministic

    # 1. resolve checkpoint, bank, dataset, prompts (one-line errors before any slow work;
    # `evaluate` validated the settings before taking the folder's lock)
    deterministic()  # as training: same checkpoint, data and thread count give the same metrics
    state = _world(settings.device)
    settings = dataclasses.replace(settings, device=_rank_device(state, settings.device))
    ctx = prepare_context(settings)
    out = Path(settings.out)
    run_passes = [2] if settings.overlays else list(range(1, settings.passes + 1))
    heads = [str(p) for p in run_passes] + (["oracle"] if settings.oracle else [])
    resolved = _resolved_settings(settings, ctx, run_passes)
    # every rank checks the folder as it was; only the main rank writes the marker
    _check_output(out, resolved)
    state.wait_for_everyone()
    if state.is_main_process:
        _claim_output(out, resolved)
    model, text, visual, k = ctx.model, ctx.text, ctx.visual, len(ctx.keep)
    refine = settings.refine_settings(ctx.encode_size, ctx.pass2_merge)

    # 2. overlays: read (pass II from storage) or write (after computing them; the main rank
    # records their settings before the others open the folder)
    reader = writer = None
    if settings.overlays:
        from bank.overlays import OverlayReader

        reader = OverlayReader(settings.overlays)
        _check_overlays(reader.settings, resolved)
    writes_overlays = settings.passes == 2 and settings.write_overlays and not settings.overlays
    for turn in (True, False):
        if writes_overlays and state.is_main_process == turn:
            from bank.overlays import OverlayWriter

            writer = OverlayWriter(out / "overlays", _overlay_settings(resolved))
        if turn:
            state.wait_for_everyone()

    autocast = _autocast(settings.precision, ctx.device)

    # 3. shards of images, each a resumable unit; batches never straddle shards. The shards not
    # done yet (the same list on every rank: read before any rank writes a part) are dealt
    # round-robin, so a resume on another number of ranks splits what is left
    indices = list(range(len(ctx.dataset)))[: settings.limit]
    shards = [indices[i : i + settings.shard_size] for i in range(0, len(indices), settings.shard_size)]
    missing = [s for s in range(len(shards)) if not part_path(out, s).is_file()]
    state.wait_for_everyone()
    todo = rank_shards(missing, state.num_processes, state.process_index)
    batches = [
        (s, shards[s][i : i + settings.batch_size]) for s in todo for i in range(0, len(shards[s]), settings.batch_size)
    ]
    loader = ctx.loader([b for _, b in batches], settings.num_workers)
    pred_dirs = {p: out / "pred" / f"pass{p}" for p in run_passes}
    lut = torch.as_tensor(ctx.keep, dtype=torch.int64)
    dataset_ignore, ignore = ctx.dataset.ignore_index, ctx.dataset.ignore_index
    conf = {h: np.zeros((k, k), np.int64) for h in heads}
    overlay_items: list = []
    image_rows: list[tuple[str, np.ndarray]] = []  # (image id, per-image counts) of this shard
    refined_rows: list[list] = []
    bar = tqdm(
        total=sum(len(b) for _, b in batches),
        desc=f"eval {ctx.dataset.info.dataset}",
        unit="img",
        disable=not (progress and state.is_main_process),
    )
    chunk = settings.class_chunk
    for (shard, batch_indices), batch in zip(batches, loader, strict=True):  # the loader yields one batch per entry
        # 4. pass I: image features once, bank prompts
        images01 = batch["image"].to(ctx.device).float().div_(255)
        with torch.inference_mode(), autocast:
            features = model.encode_image(model.image_encoder.normalize(images01))
            logits, fast, fast_index, detect_scores = {}, None, None, None
            # fast pass II decodes pass I's top classes in the context of all (pass I's attention summaries)
            fast_path = 2 in run_passes and reader is None and uses_fast_pass2(settings.topk, k, refine)
            context = PassContext() if fast_path else None
            if 1 in run_passes:
                logits["1"] = model(text=text, visual=visual, features=features, class_chunk=chunk, context_out=context)
                if context is not None:
                    fast_index = top_classes(logits["1"], settings.topk)
            # 5. pass II: detected classes' prompts replaced by their crops (pass I's features reused)
            if 2 in run_passes:
                size = tuple(images01.shape[-2:])
                gt_maps = _label_maps(batch["label"], ctx, size)  # crop quality and the oracle diagnostic
                if reader is not None:
                    refs = [reader.read(i) for i in batch["id"]]
                else:
                    # at the labels' own size, pass I's upsampled scores also serve fast pass II (step 6)
                    if fast_index is not None and not (chunk and chunk < k) and _labels_sized(batch, size):
                        detect_maps, detect_scores = scored_labels(logits["1"], size)
                    else:
                        detect_maps = predict_labels(logits["1"], size, chunk)
                    confidence = pass1_confidence(logits["1"], size) if refine.uses_confidence else None
                    refs = refine_batch(model, images01, detect_maps, refine, confidence)
                    overlay_items += [
                        (
                            i,
                            r,
                            {"class_ids": lut[r.classes].tolist(), "names": [ctx.names[c] for c in r.classes.tolist()]},
                        )
                        for i, r in zip(batch["id"], refs, strict=True)
                    ]
                    refined_rows += _crop_quality(batch["id"], refs, detect_maps, confidence, gt_maps, refine)
                if fast_index is not None:
                    part = fast_pass2(model, text, visual, features, refs, refine, fast_index, chunk, context)
                    fast = fast_index, part
                    logits["2"] = scatter_classes(logits["1"], *fast)
                else:
                    logits["2"] = pass2_logits(
                        model, text, visual, features, refs, refine, logits.get("1"), 0, settings
                    )
                # the diagnostic bound: the same pass II with crops cut from the ground truth
                if settings.oracle:
                    oracle_refine = dataclasses.replace(refine, confidence=0.0, margin=0.0, gate=0.0, erode=0)
                    gt_refs = refine_batch(model, images01, gt_maps, oracle_refine, num_classes=k)
                    logits["oracle"] = pass2_logits(
                        model, text, visual, features, gt_refs, oracle_refine, None, 0, settings
                    )
        # 6. SED's protocol per image: sigmoid, upsample to the label's size, argmax, confusion
        for j, (index, image_id, label) in enumerate(zip(batch_indices, batch["id"], batch["label"], strict=True)):
            bad = label_range_error(label, ctx.dataset.num_classes, dataset_ignore)
            if bad:
                raise UserError(
                    f"dataset {ctx.dataset.info.root} image {image_id!r} has label values {bad} "
                    f"outside 0..{ctx.dataset.num_classes - 1} and ignore {dataset_ignore}; "
                    "prepare the dataset again"
                )
            label = ctx.remap(label)
            image_conf, preds = {}, {}
            if fast is not None:  # pass II shares pass I's upsampled scores but for its k classes
                top, part = fast[0][j : j + 1], fast[1][j : j + 1]
                if detect_scores is not None:
                    pair = (
                        detect_maps[j : j + 1],
                        refined_labels(detect_scores[j : j + 1], detect_maps[j : j + 1], top, part),
                    )
                else:
                    pair = predict_labels_pair(logits["1"][j : j + 1], top, part, label.shape, chunk)
                preds = {"1": pair[0][0].cpu(), "2": pair[1][0].cpu()}
            for h in heads:
                pred = preds[h] if h in preds else predict_labels(logits[h][j : j + 1], label.shape, chunk)[0].cpu()
                image_conf[h] = confusion_matrix(pred, label, k, ignore)
                conf[h] += image_conf[h]
                if h in ("1", "2") and saves(settings.save_predictions, index):
                    _save_prediction(pred_dirs[int(h)] / f"{image_id}.png", lut[pred], ctx.dataset.num_classes)
            image_rows.append((str(image_id), image_counts([image_conf[h] for h in heads])))
        bar.update(len(batch_indices))
        # 7. a shard ends: its overlays, then its confusion part (what marks it done)
        if batch_indices[-1] == shards[shard][-1]:
            if writer is not None:
                writer.write_shard(shard, overlay_items)
            _write_image_part(out, shard, image_rows, refined_rows)
            write_part(out, shard, np.stack([conf[h] for h in heads]))
            overlay_items, image_rows, refined_rows = [], [], []
            conf = {h: np.zeros((k, k), np.int64) for h in heads}
    bar.close()
    if reader is not None:
        reader.close()

    # 8. once every rank is done: sum the parts (all ranks', this run's and earlier runs') and the
    # per-image counts, score; the main rank writes, every rank returns the same numbers
    state.wait_for_everyone()
    parts = gather_parts(out, len(shards))
    total = {h: sum(part[i] for part in parts) if parts else np.zeros((k, k), np.int64) for i, h in enumerate(heads)}
    ids, counts, refined = _read_image_parts(out, len(shards))
    metrics = _metrics(total, resolved, ctx, len(indices))
    _add_statistics(metrics, heads, counts, settings)
    metrics["ranks"] = state.num_processes  # not a setting: any number of ranks gives these numbers
    if state.is_main_process:
        _write_per_class(out / "per_class.csv", metrics, ctx)
        _write_per_image(out, ids, counts, heads, refined, ctx)
        atomic_write_json(out / "metrics.json", metrics)
    state.wait_for_everyone()
    return metrics


# ---- ranks and parts ------------------------------------------------------------------------
def _world(device: str):
    from bank.runtime import distributed_state

    return distributed_state(device)


def _rank_device(state, device: str) -> str:
    from bank.runtime import rank_device

    return rank_device(state, device)


def rank_shards(missing: list[int], world_size: int, rank: int) -> list[int]:
    """This rank's share of the shards still to do: round-robin, so ranks differ by one shard at most."""
    return missing[rank::world_size]


def part_path(out: Path, shard: int) -> Path:
    return out / PARTS / f"part-{shard:06d}.npy"


def write_part(out: Path, shard: int, confusion: np.ndarray) -> None:
    """A shard's confusion stack; its presence marks the shard done, so the shard's per-image
    part (_write_image_part) is written before it."""
    buf = io.BytesIO()
    np.save(buf, confusion, allow_pickle=False)
    atomic_write_bytes(part_path(out, shard), buf.getvalue())


def gather_parts(out: Path, shards: int) -> list[np.ndarray]:
    """Every shard's confusion stack in shard order, whichever rank or run wrote it: the order
    (and so every sum) is the one a single process gives."""
    parts = []
    for s in range(shards):
        path = part_path(out, s)
        if not path.is_file():
            raise UserError(f"{path} is missing after every rank finished; run the same eval again to resume")
        parts.append(np.load(path, allow_pickle=False))
    return parts


def _labels_sized(batch, size: tuple[int, int]) -> bool:
    return all(tuple(label.shape[-2:]) == tuple(size) for label in batch["label"])


# ---- pass II ----------------------------------------------------------------------------------
def pass2_logits(
    model, text, visual, features, refs, refine: RefineSettings, logits1, topk: int, settings, context=None
) -> torch.Tensor:
    """Pass II's logits from the refinements `refs`: prompts merged per `refine.merge`; decoded
    for all classes (exact), for each image's `topk` best pass-I classes only (the rest keep
    pass I's logits), or, with merge `add`, one image at a time with the crop copies appended."""
    chunk = settings.class_chunk
    if refine.merge == "add":
        parts = []
        for j, ref in enumerate(refs):
            text_j, visual_j, owners = add_classes(text, visual, ref)
            out = model(text=text_j, visual=visual_j, features=_select_image(features, j), class_chunk=chunk)
            parts.append(merge_added(out, owners, visual.num_classes))
        return torch.cat(parts, dim=0)
    if logits1 is not None and uses_fast_pass2(topk, visual.num_classes, refine):
        index = top_classes(logits1, topk)
        part = fast_pass2(model, text, visual, features, refs, refine, index, chunk, context)
        return scatter_classes(logits1, index, part)
    visual2 = replace_prompts(visual, refs, refine.merge, refine.share)
    return model(text=text, visual=visual2, features=features, class_chunk=chunk)


def uses_fast_pass2(topk: int, num_classes: int, refine: RefineSettings) -> bool:
    return bool(topk) and topk < num_classes and refine.merge != "add"


def fast_pass2(
    model, text, visual, features, refs, refine: RefineSettings, index, chunk, context: PassContext | None = None
) -> torch.Tensor:
    """Pass II's logits (B, k, h, w) of the classes `index` (B, k) only: each image's best pass-I
    classes (`top_classes`). Only those classes' prompts are gathered and merged (a refined
    class outside them cannot change a decoded logit). With `context` (what pass I's decode of
    all classes left: `model(..., context_out=PassContext())`), the k classes attend against all
    N classes, as in the exact pass II, instead of against each other only: against their own
    pass-II states and the other N - k classes' pass-I states (`PassContext.without`)."""
    text_k, visual_k = select_classes(text, visual, index)
    refs_k = [restrict_refinement(r, index[b]) for b, r in enumerate(refs)]
    visual_k = replace_prompts(visual_k, refs_k, refine.merge, refine.share)
    if context is not None:
        context = context.without(index)
    return model(text=text_k, visual=visual_k, features=features, class_chunk=chunk, context=context)


def _select_image(features, j: int):
    from dpseg.clip import ImageFeatures

    return ImageFeatures({s: f[j : j + 1] for s, f in features.levels.items()}, features.dense[j : j + 1])


def _label_maps(labels, ctx: EvalContext, size: tuple[int, int]) -> torch.Tensor:
    """The batch's ground truth (evaluated class indices) at the model input: ignored pixels and
    other classes are `len(ctx.keep)` (never a class)."""
    k = len(ctx.keep)
    maps = [
        label_maps(torch.as_tensor(np.asarray(ctx.remap(lab)))[None], k, ctx.dataset.ignore_index, size)
        for lab in labels
    ]
    return torch.cat(maps).to(ctx.device)


def _crop_quality(ids, refs, detect_maps, confidence, gt_maps, refine: RefineSettings) -> list[list]:
    """Per image and refined class: its pass-I area, its ground-truth area (0: a false
    detection), and the precision and recall of the cropped mask against the ground truth."""
    rows = []
    for j, (image_id, ref) in enumerate(zip(ids, refs, strict=True)):
        conf_j = confidence[j] if confidence is not None else None
        for c, area in zip(ref.classes.tolist(), ref.areas.tolist(), strict=True):
            mask = class_mask(detect_maps[j], c, refine, conf_j)
            gt = gt_maps[j] == c
            hit = int((mask & gt).sum()) if mask is not None else 0
            cropped = int(mask.sum()) if mask is not None else 0
            rows.append([str(image_id), c, area, int(gt.sum()), cropped, hit])
    return rows


# ---- per-image statistics -----------------------------------------------------------------------
def image_counts(confs: list[np.ndarray]) -> np.ndarray:
    """(1 + 2H, K) int64 for one image from its H heads' confusion matrices: row 0 the
    ground-truth pixels per class, then per head its true positives, then per head its
    predicted pixels."""
    gt = confs[0].sum(axis=1)
    return np.stack([gt, *[np.diag(c) for c in confs], *[c.sum(axis=0) for c in confs]]).astype(np.int64)


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _write_image_part(out: Path, shard: int, image_rows: list, refined_rows: list) -> None:
    # written before the shard's confusion part, which is what marks the shard done
    if image_rows:
        _save_npy(out / PARTS / f"images-{shard:06d}.npy", np.stack([c for _, c in image_rows]))
    atomic_write_json(
        out / PARTS / f"images-{shard:06d}.json", {"ids": [i for i, _ in image_rows], "refined": refined_rows}
    )


def _read_image_parts(out: Path, shards: int) -> tuple[list[str], np.ndarray | None, list]:
    ids, arrays, refined = [], [], []
    for s in range(shards):
        meta = out / PARTS / f"images-{s:06d}.json"
        if not meta.is_file():  # a shard from a run before per-image statistics existed
            return [], None, []
        info = json.loads(meta.read_text())
        ids += info["ids"]
        refined += info["refined"]
        if info["ids"]:
            arrays.append(np.load(out / PARTS / f"images-{s:06d}.npy", allow_pickle=False))
    return ids, (np.concatenate(arrays) if arrays else None), refined


def head_counts(counts: np.ndarray, heads: list[str], head: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, gt, pred), each (images, K), of one head from `image_counts` rows."""
    h = heads.index(head)
    return counts[:, 1 + h], counts[:, 0], counts[:, 1 + len(heads) + h]


MIN_ORACLE_GAIN = 1.0  # mIoU points: below it the oracle leaves no gain to close, and a share would mislead


def oracle_share(pass1: float, pass2: float, oracle: float) -> float | None:
    """The share of the oracle's gain over pass I that pass II closes; None where the oracle gains
    less than MIN_ORACLE_GAIN (a decoder that cannot use crops: -615% would be read as a result)."""
    gain = oracle - pass1
    return (pass2 - pass1) / gain if gain >= MIN_ORACLE_GAIN else None


def _add_statistics(metrics: dict, heads: list[str], counts: np.ndarray | None, settings: EvalSettings) -> None:
    passes = metrics["passes"]
    if counts is not None and "1" in heads and "2" in heads and settings.bootstrap:
        tp1, gt, pred1 = head_counts(counts, heads, "1")
        tp2, _, pred2 = head_counts(counts, heads, "2")
        boot = paired_bootstrap(tp1, pred1, tp2, pred2, gt, settings.bootstrap, settings.bootstrap_seed)
        metrics["paired_bootstrap"] = {
            "statistic": "pass II mIoU - pass I mIoU, images resampled with replacement (paired)",
            **boot,
        }
    if "oracle" in heads:
        total = metrics.pop("_oracle_conf")
        scores = segmentation_scores(total)
        one, two, bound = passes.get("1", {}).get("miou"), passes.get("2", {}).get("miou"), scores["miou"]
        diag = {
            "note": "DIAGNOSTIC, not a result: pass II with crops cut from the ground-truth masks (an upper "
            "bound on what better crops could give); never a headline number",
            "pass2_oracle": scores,
        }
        if None not in (one, two, bound):
            diag["oracle_gain"] = bound - one
            diag["share_of_oracle_gain_closed"] = oracle_share(one, two, bound)
        if counts is not None and settings.bootstrap and "1" in heads:
            tp1, gt, pred1 = head_counts(counts, heads, "1")
            tpo, _, predo = head_counts(counts, heads, "oracle")
            diag["oracle_minus_pass1_bootstrap"] = paired_bootstrap(
                tp1, pred1, tpo, predo, gt, settings.bootstrap, settings.bootstrap_seed
            )
        metrics["diagnostics"] = diag
    metrics.pop("_oracle_conf", None)


def _write_per_image(out: Path, ids: list[str], counts, heads: list[str], refined: list, ctx: EvalContext) -> None:
    if counts is not None:
        _save_npy(out / "per_image" / "counts.npy", counts)
        rows = ["gt", *[f"tp_{h}" for h in heads], *[f"pred_{h}" for h in heads]]
        atomic_write_json(out / "per_image" / "ids.json", {"ids": ids, "rows": rows, "classes": list(ctx.names)})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "class", "name", "area", "gt_area", "cropped", "cropped_in_gt"])
    for image_id, c, area, gt_area, cropped, hit in refined:
        w.writerow([image_id, c, ctx.names[c], area, gt_area, cropped, hit])
    atomic_write_bytes(out / "refinement.csv", buf.getvalue().encode())


# ---- pieces ---------------------------------------------------------------------------------
def saves(save_predictions: bool | int, index: int) -> bool:
    """Whether image `index` (of the evaluated order) has its predictions written."""
    if isinstance(save_predictions, bool):
        return save_predictions
    return index < save_predictions


def _autocast(precision: str, device: torch.device):
    """SED evaluates in fp32 (TF32 matmuls on GPUs, as its train_net.py sets); bf16/fp16 on request."""
    dtype = EVAL_PRECISIONS[precision]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type != "cuda":
        raise UserError("--precision fp16 needs a GPU; on the CPU use fp32 or bf16")
    return torch.autocast(device.type, dtype=dtype)


def _resolved_settings(settings: EvalSettings, ctx: EvalContext, run_passes: list[int]) -> dict:
    s = asdict(settings)
    s.update(
        {
            "dataset_name": ctx.dataset.info.dataset,
            "vocabulary": ctx.dataset.info.vocabulary,
            "bank": str(ctx.bank_dir),
            "bank_generator": ctx.bank_generator,
            "encoder": ctx.encoder,
            "encoder_weights": ctx.encoder_weights,
            "encode_size": ctx.encode_size,
            "size": ctx.size,
            "templates": ctx.templates,
            "prompt_mode": ctx.model.cfg.prompt_mode,
            "passes_run": run_passes,
            "class_ids": list(ctx.keep),
            "class_names": list(ctx.names),
            "text_prompts": ctx.text_source,
            "refinement": {
                **settings.refine_settings(ctx.encode_size, ctx.pass2_merge).to_dict(),
                "topk": settings.topk,
                "min_area_unit": "pixels of the model input",
            },
            "checkpoint_step": ctx.checkpoint_step,
        }
    )
    for key in ("progress", "num_workers", "device", "text_cache"):
        s.pop(key, None)
    return s


def _identity(resolved: dict) -> str:
    # what the numbers depend on: a rerun with the same identity resumes, another one is refused
    ignore = {"out", "batch_size", "save_predictions", "write_overlays"}
    payload = json.dumps({k: v for k, v in resolved.items() if k not in ignore}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _check_output(out: Path, resolved: dict) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    marker = out / PARTS / "settings.json"
    if marker.is_file():
        previous = json.loads(marker.read_text()).get("identity")
        if previous != _identity(resolved):
            raise UserError(f"--out {out} holds an evaluation with other settings; choose another --out or delete it")
    elif out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no evaluation; choose an empty or new folder")


def _claim_output(out: Path, resolved: dict) -> None:
    _check_output(out, resolved)
    atomic_write_json(out / PARTS / "settings.json", {"identity": _identity(resolved), "settings": resolved})


def _overlay_settings(resolved: dict) -> dict:
    keys = (
        "checkpoint",
        "dataset",
        "split",
        "classes",
        "encoder",
        "encoder_weights",
        "encode_size",
        "size",
        "templates",
        "class_names",
        "refinement",
        "bank",
    )
    return {k: resolved[k] for k in keys}


def _check_overlays(stored: dict, resolved: dict) -> None:
    # the refined features must be for this vocabulary and this prompt tower; other settings
    # (another checkpoint's detections) are a legitimate study, so they are not refused
    for key in ("class_names", "encoder", "encoder_weights", "templates"):
        if stored.get(key) != resolved[key]:
            what = f"{key.replace('_', ' ')} ({str(stored.get(key))[:60]})"
            raise UserError(
                f"the overlays were made for another {what}; "
                "evaluate with the settings that wrote them or write new ones with --passes 2"
            )


def _save_prediction(path: Path, ids: torch.Tensor, num_classes: int) -> None:
    array = ids.numpy()
    image = Image.fromarray(array.astype(np.uint8)) if num_classes <= 255 else Image.fromarray(array.astype(np.uint16))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue(), sync=False)


def _metrics(total: dict[str, np.ndarray], resolved: dict, ctx: EvalContext, images: int) -> dict:
    passes = {}
    for p, conf in total.items():
        if p == "oracle":
            continue
        scores = segmentation_scores(conf)
        scores["images"] = images
        scores["uniform_random_miou"] = uniform_random_miou(conf.sum(axis=1))
        scores["gt_pixels"] = conf.sum(axis=1).tolist()
        passes[str(p)] = scores
    out = {
        "format": FORMAT,
        "images": images,
        "class_names": list(ctx.names),
        "class_ids": list(ctx.keep),
        "passes": passes,
        "settings": resolved,
        "environment": environment(),  # thread count and library versions the numbers were computed with
    }
    if "1" in passes and "2" in passes and passes["1"]["miou"] is not None:
        out["pass2_minus_pass1_miou"] = passes["2"]["miou"] - passes["1"]["miou"]
    if "oracle" in total:
        out["_oracle_conf"] = total["oracle"]
    return out


def _write_per_class(path: Path, metrics: dict, ctx: EvalContext) -> None:
    passes = sorted(metrics["passes"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class_id", "name", "gt_pixels", *[f"{m}_pass{p}" for p in passes for m in ("iou", "acc")]])
    first = metrics["passes"][passes[0]]
    for i, (cid, name) in enumerate(zip(ctx.keep, ctx.names, strict=True)):
        row = [cid, name, first["gt_pixels"][i]]
        for p in passes:
            for m in ("per_class_iou", "per_class_acc"):
                v = metrics["passes"][p][m][i]
                row.append("" if v is None else f"{v:.4f}")
        w.writerow(row)
    atomic_write_bytes(path, buf.getvalue().encode())
