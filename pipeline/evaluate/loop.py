"""Stage three: two-pass evaluation (SED's protocol + DPSeg's prompt refinement).

    metrics = evaluate(EvalSettings(checkpoint="out/train/checkpoint", dataset="data/shapes", out="out/eval"))

OUT/metrics.json      per pass: mIoU (classes present in the ground truth), fwIoU, pAcc, mAcc,
                      per-class IoU, images, uniform-random mIoU; the resolved settings
OUT/per_class.csv     one row per evaluated class
OUT/pred/pass{1,2}/<id>.png   with save_predictions: dataset label ids (uint8, uint16 above 255 classes)
OUT/overlays/overlay-%06d.tar refined prompts per image (bank/overlays.py)
OUT/.parts/           per-shard confusion matrices: a killed run resumes at the first unfinished shard

The images are processed in shards of `shard_size`; a shard is done when its confusion part is
written (after its overlay shard and predictions), so a rerun skips done shards.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpseg.errors import UserError
from dpseg.io import atomic_write_bytes, atomic_write_json
from dpseg.metrics import confusion_matrix, label_range_error, predict_labels, segmentation_scores, uniform_random_miou
from dpseg.refine import CROP_MODES, DEFAULT_MIN_AREA, RefineSettings, refine_batch, replace_prompts
from pipeline.evaluate.setup import EvalContext, prepare_context

FORMAT = "dpseg-eval-1"
PARTS = ".parts"


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
    merge: str = "replace"  # replace | mix | blend | add
    share: float = 1.0  # mix: share of the M slots given to crops; blend: the crops' weight
    fit: bool = False  # encode each crop at the smallest multiple of 32 holding it (speed)
    topk: int = 0  # fast pass II: decode each image's k best pass-I classes only, the rest kept (0: exact)
    # diagnostics and statistics
    oracle: bool = False  # also run pass II with crops cut from the ground truth (a diagnostic bound)
    bootstrap: int = 1000  # paired bootstrap resamples of images for the pass II - pass I interval (0: off)
    bootstrap_seed: int = 0
    batch_size: int = 4
    num_workers: int = 2
    class_chunk: int | None = None
    save_predictions: bool = False
    overlays: str | None = None  # run pass II from these stored overlays (no pass I)
    write_overlays: bool = True
    shard_size: int = 64
    limit: int | None = None  # evaluate the first N images only
    device: str = "auto"
    text_cache: str | None = None

    def validate(self) -> None:
        if self.passes not in (1, 2):
            raise UserError(f"passes must be 1 or 2, got {self.passes}")
        if self.crop not in CROP_MODES:
            raise UserError(f"crop {self.crop!r} is not one of {', '.join(CROP_MODES)}")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("min_area", "instances", "num_workers", "erode", "topk", "bootstrap"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.size is not None and (self.size < 32 or self.size % 32):
            raise UserError(f"size must be a positive multiple of 32 (the encoder's stride), got {self.size}")
        if self.overlays is not None and self.passes != 2:
            raise UserError("--overlays gives pass II's prompts: use it with --passes 2")
        if self.oracle and (self.passes != 2 or self.overlays is not None):
            raise UserError("--oracle is a pass-II diagnostic: use it with --passes 2 and without --overlays")
        if self.topk and self.merge == "add":
            raise UserError("--topk decodes a subset of the classes; --merge add appends classes: use one of them")
        self.refine_settings(64)  # one-line errors for the refinement settings

    def refine_settings(self, encode_size: int) -> RefineSettings:
        return RefineSettings(
            encode_size,
            self.min_area,
            self.crop,
            self.instances,
            confidence=self.confidence,
            margin=self.margin,
            erode=self.erode,
            gate=self.gate,
            merge=self.merge,
            share=self.share,
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
    from tqdm.auto import tqdm

    # 1. resolve checkpoint, bank, dataset, prompts (one-line errors before any slow work)
    settings.validate()
    ctx = prepare_context(settings)
    out = Path(settings.out)
    run_passes = [2] if settings.overlays else list(range(1, settings.passes + 1))
    resolved = _resolved_settings(settings, ctx, run_passes)
    _claim_output(out, resolved)
    model, text, visual, k = ctx.model, ctx.text, ctx.visual, len(ctx.keep)
    refine = RefineSettings(ctx.encode_size, settings.min_area, settings.crop, settings.instances)

    # 2. overlays: read (pass II from storage) or write (after computing them)
    reader = writer = None
    if settings.overlays:
        from bank.overlays import OverlayReader

        reader = OverlayReader(settings.overlays)
        _check_overlays(reader.settings, resolved)
    elif settings.passes == 2 and settings.write_overlays:
        from bank.overlays import OverlayWriter

        writer = OverlayWriter(out / "overlays", _overlay_settings(resolved))

    # 3. shards of images, each a resumable unit; batches never straddle shards
    indices = list(range(len(ctx.dataset)))[: settings.limit]
    shards = [indices[i : i + settings.shard_size] for i in range(0, len(indices), settings.shard_size)]
    todo = [s for s in range(len(shards)) if not (out / PARTS / f"part-{s:06d}.npy").is_file()]
    batches = [
        (s, shards[s][i : i + settings.batch_size]) for s in todo for i in range(0, len(shards[s]), settings.batch_size)
    ]
    loader = ctx.loader([b for _, b in batches], settings.num_workers)
    pred_dirs = {p: out / "pred" / f"pass{p}" for p in run_passes}
    lut = torch.as_tensor(ctx.keep, dtype=torch.int64)
    dataset_ignore, ignore = ctx.dataset.ignore_index, ctx.dataset.ignore_index
    conf = {p: np.zeros((k, k), np.int64) for p in run_passes}
    overlay_items: list = []
    bar = tqdm(
        total=sum(len(b) for _, b in batches), desc=f"eval {ctx.dataset.info.dataset}", unit="img", disable=not progress
    )
    for (shard, batch_indices), batch in zip(batches, loader, strict=True):  # the loader yields one batch per entry
        # 4. pass I: image features once, bank prompts
        images01 = batch["image"].to(ctx.device).float().div_(255)
        with torch.inference_mode():
            features = model.encode_image(model.image_encoder.normalize(images01))
            logits = {}
            if 1 in run_passes:
                logits[1] = model(text=text, visual=visual, features=features, class_chunk=settings.class_chunk)
            # 5. pass II: detected classes' prompts replaced by their crops (pass I's features reused)
            if 2 in run_passes:
                if reader is not None:
                    refs = [reader.read(i) for i in batch["id"]]
                else:
                    size = images01.shape[-2:]
                    detect_maps = predict_labels(logits[1], size, settings.class_chunk)
                    refs = refine_batch(model, images01, detect_maps, refine)
                    overlay_items += [
                        (
                            i,
                            r,
                            {"class_ids": lut[r.classes].tolist(), "names": [ctx.names[c] for c in r.classes.tolist()]},
                        )
                        for i, r in zip(batch["id"], refs, strict=True)
                    ]
                logits[2] = model(
                    text=text, visual=replace_prompts(visual, refs), features=features, class_chunk=settings.class_chunk
                )
        # 6. SED's protocol per image: sigmoid, upsample to the label's size, argmax, confusion
        for j, (image_id, label) in enumerate(zip(batch["id"], batch["label"], strict=True)):
            bad = label_range_error(label, ctx.dataset.num_classes, dataset_ignore)
            if bad:
                raise UserError(
                    f"dataset {ctx.dataset.info.root} image {image_id!r} has label values {bad} "
                    f"outside 0..{ctx.dataset.num_classes - 1} and ignore {dataset_ignore}; "
                    "prepare the dataset again"
                )
            label = ctx.remap(label)
            for p in run_passes:
                pred = predict_labels(logits[p][j : j + 1], label.shape, settings.class_chunk)[0].cpu()
                conf[p] += confusion_matrix(pred, label, k, ignore)
                if settings.save_predictions:
                    _save_prediction(pred_dirs[p] / f"{image_id}.png", lut[pred], ctx.dataset.num_classes)
        bar.update(len(batch_indices))
        # 7. a shard ends: its overlays, then its confusion part (what marks it done)
        if batch_indices[-1] == shards[shard][-1]:
            if writer is not None:
                writer.write_shard(shard, overlay_items)
            part = np.stack([conf[p] for p in run_passes])
            buf = io.BytesIO()
            np.save(buf, part, allow_pickle=False)
            atomic_write_bytes(out / PARTS / f"part-{shard:06d}.npy", buf.getvalue())
            overlay_items = []
            conf = {p: np.zeros((k, k), np.int64) for p in run_passes}
    bar.close()
    if reader is not None:
        reader.close()

    # 8. sum the parts (this run's and earlier runs'), score, write
    total = {p: np.zeros((k, k), np.int64) for p in run_passes}
    for s in range(len(shards)):
        part = np.load(out / PARTS / f"part-{s:06d}.npy", allow_pickle=False)
        for i, p in enumerate(run_passes):
            total[p] += part[i]
    metrics = _metrics(total, resolved, ctx, len(indices))
    _write_per_class(out / "per_class.csv", metrics, ctx)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


# ---- pieces ---------------------------------------------------------------------------------
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
                "min_area": settings.min_area,
                "crop": settings.crop,
                "instances": settings.instances,
                "encode_size": ctx.encode_size,
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


def _claim_output(out: Path, resolved: dict) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    marker = out / PARTS / "settings.json"
    ident = _identity(resolved)
    if marker.is_file():
        previous = json.loads(marker.read_text()).get("identity")
        if previous != ident:
            raise UserError(f"--out {out} holds an evaluation with other settings; choose another --out or delete it")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no evaluation; choose an empty or new folder")
    atomic_write_json(marker, {"identity": ident, "settings": resolved})


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


def _metrics(total: dict[int, np.ndarray], resolved: dict, ctx: EvalContext, images: int) -> dict:
    passes = {}
    for p, conf in total.items():
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
    }
    if "1" in passes and "2" in passes and passes["1"]["miou"] is not None:
        out["pass2_minus_pass1_miou"] = passes["2"]["miou"] - passes["1"]["miou"]
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
