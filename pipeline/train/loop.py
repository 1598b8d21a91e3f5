"""Stage two: train DPSeg on a prepared dataset with text prompts and the bank's visual prompts.

    summary = train(TrainSettings(dataset="data/shapes", bank="out/bank", classes="seen", out="out/train"))

One loop, top to bottom: (1) resolve and check every input, (2) the run folder and resume,
(3) the model, (4) the prompts, (5) the data, (6) optimizer and schedule, (7) accelerate,
(8) the loop, (9) the final checkpoint and summary. Runs on one CPU, one GPU, or many GPUs and
nodes under `accelerate launch` with no change; the batch size is the global batch, so a recipe
trains the same whatever the number of ranks (docs/train.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpseg.errors import UserError
from dpseg.io import atomic_write_bytes, atomic_write_json
from dpseg.metrics import predict_labels
from pipeline.provenance import git_commit

SUMMARY_FILE = "train.json"
METRICS_FILE = "metrics.jsonl"
LOSS_CSV = "loss.csv"


@dataclass
class TrainSettings:
    """Defaults are the paper's and SED's recipe (docs/train.md says which is whose)."""

    dataset: str = ""  # prepared dataset folder (`dpseg data prepare` / `dpseg data synth`)
    bank: str | None = None  # visual-prompt bank folder (not needed text-only)
    out: str = "out/train"
    encoder: str | None = None  # default: the bank's encoder
    encoder_weights: str | None = None  # default: the weights the bank was encoded with
    classes: str | None = None  # class subset trained on: None/'all', 'seen', or ids '0,3,7'
    templates: int | None = None  # default: the bank's template count (80 without a bank)
    encode_size: int | None = None  # prompt encode size the bank must hold (default: whatever it holds)
    prompt_mode: str = "dual"  # text | visual | dual (paper Table 2a)
    fusion: str = "avg-embeddings"  # avg-embeddings | concat-costs | avg-costs (Table 2b)
    visual_guidance: str = "prompt"  # prompt | upsampled-cost | none (Table 3)
    deep_supervision: bool = True  # SED's aux heads with BCE on each
    model_overrides: dict = field(default_factory=dict)  # any other DPSegConfig field
    steps: int = 80_000
    batch_size: int = 4  # global: over ranks and accumulation steps
    crop_size: int = 768
    lr: float = 2e-4
    weight_decay: float = 1e-4
    image_lr_multiplier: float = 0.01
    grad_clip: float = 0.01  # SED: full-model gradient norm; 0 = off
    grad_accum: int = 1
    color_jitter: bool = True  # SED's photometric distortion
    # not in the paper: this share of each present class's M bank prompts is replaced, per image and
    # step, by the prompt tower's features of that class's ground-truth crop from the training image,
    # so the decoder meets crop prompts (what pass II feeds it) in training. 0 = off (the paper profiles)
    crop_prompts: float = 0.0
    # not in the paper: with crop_prompts, this many absent classes per image also get a present class's
    # crop in those slots, as pass II's false detections do; the label still says "absent", so a crop
    # prompt alone is not evidence of its class. 0 = off
    crop_negatives: int = 0
    # with crop_negatives: which absent classes take a crop. random: any; similar: among the few whose bank
    # prompts are nearest the crop's class, the classes pass I confuses it with and pass II refines falsely
    crop_negative_classes: str = "random"
    # with crop_prompts: the share of training images whose prompts get crops; the others keep the bank's
    # for every class, as pass I does, so bank prompts of present classes stay meaningful
    crop_prompt_images: float = 1.0
    # with crop_prompts: the share of present classes (drawn per class) that get their crop; the others keep
    # the bank's prompts, as the classes pass I misses do in pass II, so a class without a crop can be present
    crop_present_share: float = 1.0
    # with crop_prompts: the share of the steps trained on the bank's prompts alone before crop prompts
    # begin (0: from the first step), so the decoder learns bank prompts first and crops late
    crop_prompts_from: float = 0.0
    # with crop_prompts: where crops are cut from. truth: the label map; prediction: the decoder's own
    # current prediction with the bank's prompts (no gradient), as pass II cuts them from pass I's
    crop_source: str = "truth"
    mixed_precision: str = "fp32"  # fp32 (= no; SED's) | bf16 | fp16 | auto (bf16 on GPUs that have it, else fp16)
    seed: int = 0
    num_workers: int = 4
    log_every: int = 20
    checkpoint_every: int = 1000  # 0: only at the end
    val_every: int = 0  # 0: no periodic validation
    val_images: int = 16
    val_split: str = "val"
    resume: str = "auto"  # auto: continue OUT/checkpoint if there is one | yes: it must exist | no: start over

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train(recipe: TrainSettings, progress: bool = True) -> dict:
    from accelerate import Accelerator

    from dpseg.reproducibility import deterministic
    from pipeline.train.resolve import check_numbers, resolve

    # 1. resolve and check everything before any compute
    check_numbers(recipe)
    deterministic()  # same recipe, data and thread count: the same weights, bit for bit
    gpu = torch.cuda.is_available()
    precision = resolve_precision(recipe.mixed_precision, gpu)
    if gpu:  # SED's train_net.py: fp32 training with TF32 matmuls on GPUs that have them
        torch.set_float32_matmul_precision("high")
    accelerator = Accelerator(cpu=not gpu, mixed_precision=precision)
    plan = resolve(recipe, accelerator.num_processes)
    # the run folder has one writer: this launch (its main rank holds the lock for every rank)
    with run_lock(Path(plan.recipe.out), "dpseg train", accelerator):
        return _train(plan, accelerator, precision, gpu, progress)


def run_lock(out: Path, command: str, accelerator) -> contextlib.AbstractContextManager:
    """`folder_lock` on the main rank; the other ranks learn whether it was refused, so a refused
    launch stops on every rank with the same line instead of waiting at its first barrier."""
    from dpseg.io import folder_lock

    stack = contextlib.ExitStack()
    refused = None
    if accelerator.is_main_process:
        try:
            stack.enter_context(folder_lock(out, command))
        except UserError as err:
            refused = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([refused])[0]
    if refused is not None:
        stack.close()
        raise UserError(refused)
    return stack


def _train(plan, accelerator, precision: str, gpu: bool, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from dpseg.model import VisualPrompts, build_dpseg
    from dpseg.model.loss import deep_supervision_bce
    from pipeline.text_cache import cached_text_embeddings
    from pipeline.train import state as ckpt
    from pipeline.train.data import StreamLayout, train_loader
    from pipeline.train.resolve import check_resumable
    from pipeline.train.validate import Validator

    r = plan.recipe
    out = Path(r.out)
    device = accelerator.device

    # 2. the run folder: resume its checkpoint, or start over
    folder = ckpt.recover(out) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    folder = out / ckpt.CHECKPOINT if (out / ckpt.CHECKPOINT / ckpt.STATE_FILE).is_file() else None
    if r.resume == "yes" and folder is None:
        raise UserError(f"--resume yes: {out} holds no checkpoint to resume; drop --resume to start a new run")
    if r.resume == "no":
        folder = None
    state = {"step": 0, "seconds": 0.0}
    if folder is not None:
        state = ckpt.read_state(folder)
        recorded = recorded_recipe(r, out)
        saved = same_places(state.get("recipe", {}), recorded, out, ckpt.weights_sha256(folder))
        check_resumable(saved, recorded, folder)
    elif accelerator.is_main_process:
        for name in (ckpt.CHECKPOINT, METRICS_FILE, LOSS_CSV, SUMMARY_FILE):
            remove(out / name)
    accelerator.wait_for_everyone()
    start_step = int(state["step"])

    # 3. the model: frozen towers from the recorded weights, decoder from the recipe's seed
    torch.manual_seed(r.seed)
    model = build_dpseg(plan.model_cfg, weights=plan.weights, device="cpu")
    if folder is not None:
        trained = ckpt.load_checkpoint_model(folder, "cpu")
        model.load_state_dict(trained.state_dict())
        del trained
    model.to(device).train()

    # 4. prompts: cached text embeddings, the bank's prototypes for the training classes
    text = cached_text_embeddings(model, plan.class_names).to(device) if plan.model_cfg.uses_text else None
    visual = None
    if plan.prototypes is not None:
        p = plan.prototypes
        visual = VisualPrompts(p.embedding, {s: p.pooled[s] for s in plan.model_cfg.guidance_strides}).to(device)

    # 5. data: a seeded sample stream, this rank's slice of each global batch
    layout = StreamLayout(
        r.batch_size, plan.micro_batch, r.grad_accum, accelerator.num_processes, accelerator.process_index
    )
    loader = train_loader(
        plan.dataset,
        plan.keep,
        r.crop_size,
        r.seed,
        layout,
        start_step,
        r.steps,
        r.num_workers,
        pin_memory=gpu,
        color_jitter=r.color_jitter,
    )
    validator = Validator(plan.val_dataset, plan.keep, r.crop_size, r.val_images) if plan.val_dataset else None

    # 6. AdamW (no decay on norms and biases; image tower at lr x multiplier), cosine to zero, no warm-up
    optimizer = torch.optim.AdamW(model.param_groups(r.lr, r.weight_decay), lr=r.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(r.steps))
    if folder is not None:
        meta = ckpt.safe_restore(folder, optimizer, accelerator.process_index)
        scheduler.load_state_dict(meta["scheduler"])
    if start_step == 0:
        torch.manual_seed(r.seed + 1_000_003 * accelerator.process_index)  # dropout / drop-path streams per rank

    # 7. accelerate: DDP across ranks, autocast; the scheduler stays ours (one step per optimizer step)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    extra = run_record(r, plan, accelerator)

    def save(step: int, seconds: float) -> None:
        record = {**extra, "step": step}
        ckpt.save_checkpoint(
            out,
            model,
            optimizer.optimizer,
            scheduler,
            {"step": step, "seconds": seconds, "recipe": recorded_recipe(r, out), "samples": step * r.batch_size},
            record,
            accelerator,
        )
        if accelerator.is_main_process:
            write_loss_csv(out)

    # 8. the loop
    log = MetricsLog(out / METRICS_FILE, start_step, accelerator.is_main_process)
    began = time.perf_counter() - float(state["seconds"])
    batches = iter(loader)
    bar = tqdm(
        total=r.steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    last_saved = start_step if folder is not None else None
    loss_value = float("nan")
    # the bank's prototypes do not change in training: "similar" negatives' neighbours once
    nearest = similar_classes(visual) if visual is not None and r.crop_negative_classes == "similar" else None
    for step in range(start_step, r.steps):
        step_loss = torch.zeros((), device=device)
        for micro in range(r.grad_accum):
            images, labels = next(batches)
            images = images.to(device, non_blocking=True).float().div_(255)
            labels = labels.to(device, non_blocking=True)
            sync = contextlib.nullcontext() if micro == r.grad_accum - 1 else accelerator.no_sync(ddp_model)
            step_visual = visual
            if visual is not None and crop_prompts_active(r, step):
                detections = None
                if r.crop_source == "prediction":  # what pass I would detect, from this step's decoder
                    with torch.no_grad(), accelerator.autocast():
                        own = model(model.image_encoder.normalize(images), text=text, visual=visual)
                        detections = predict_labels(own, tuple(images.shape[-2:]))
                step_visual = crop_prompt_visual(
                    model,
                    images,
                    labels,
                    visual,
                    r.crop_prompts,
                    plan.encode_size,
                    plan.dataset.ignore_index,
                    negatives=r.crop_negatives,
                    nearest=nearest,
                    image_share=r.crop_prompt_images,
                    present_share=r.crop_present_share,
                    generator=torch.Generator().manual_seed(r.seed * 1_000_003 + step * r.grad_accum + micro),
                    detections=detections,
                )
            with sync, accelerator.autocast():
                logits, aux = ddp_model(model.image_encoder.normalize(images), text=text, visual=step_visual, aux=True)
                loss = (
                    deep_supervision_bce(
                        logits.float(),
                        [a.float() for a in aux],
                        labels,
                        ignore_index=plan.dataset.ignore_index,
                        policy=plan.model_cfg.ignore_policy,
                    )
                    / r.grad_accum
                )
                accelerator.backward(loss)
            step_loss += loss.detach()
        loss_value = float(accelerator.reduce(step_loss, "mean"))
        if not math.isfinite(loss_value):
            bar.close()
            kept = (
                f"the last good checkpoint (step {last_saved}) is kept in {out / ckpt.CHECKPOINT}"
                if last_saved is not None
                else "no checkpoint was written yet"
            )
            raise UserError(
                f"loss is {loss_value} at step {step + 1}; training stopped and {kept}; lower --lr or check the data"
            )
        grad_norm = accelerator.clip_grad_norm_(trainable, r.grad_clip) if r.grad_clip > 0 else None
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        ckpt.crash_point("step")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if done % r.log_every == 0 or done == r.steps:
            seconds = round(time.perf_counter() - began, 3)
            record = {"step": done, "loss": round(loss_value, 6), "lr": lr, "seconds": seconds}
            if grad_norm is not None:
                record["grad_norm"] = round(float(grad_norm), 6)
            log.write(record)
        if validator is not None and done % r.val_every == 0 and accelerator.is_main_process:
            log.write({"step": done, **validator(model, text, visual, device)})
        if r.checkpoint_every and done % r.checkpoint_every == 0 and done != r.steps:
            save(done, time.perf_counter() - began)
            last_saved = done
    bar.close()

    # 9. the final checkpoint and the summary
    seconds = time.perf_counter() - began
    final_step = max(r.steps, start_step)
    if last_saved != final_step:
        save(final_step, seconds)
    summary = {
        "out": str(out),
        "checkpoint": str(out / ckpt.CHECKPOINT),
        "steps": final_step,
        "resumed_from": start_step,
        "final_loss": loss_value if start_step < r.steps else None,
        "seconds": round(seconds, 2),
        "ranks": accelerator.num_processes,
        "mixed_precision": precision,
        "device": str(device),
        "params": model.parameter_counts(),
        **extra,
    }
    if validator is not None and accelerator.is_main_process:
        summary["validation"] = validator(model, text, visual, device)
    if accelerator.is_main_process:
        atomic_write_json(out / SUMMARY_FILE, summary)
    accelerator.wait_for_everyone()
    return summary


# ---- helpers the loop uses ---------------------------------------------------------------------
def crop_prompts_active(recipe: TrainSettings, step: int) -> bool:
    """Whether optimizer step `step` (0-based) trains with crop prompts: `crop_prompts` is on and
    the first `crop_prompts_from` share of the steps (rounded up) is behind."""
    return recipe.crop_prompts > 0 and step >= math.ceil(recipe.crop_prompts_from * recipe.steps)


def crop_prompt_visual(
    model,
    images,
    labels,
    visual,
    share: float,
    encode_size: int | None,
    ignore_index: int,
    negatives: int = 0,
    generator: torch.Generator | None = None,
    image_share: float = 1.0,
    detections: torch.Tensor | None = None,
    nearest: torch.Tensor | None = None,
    present_share: float = 1.0,
):
    """Per-image prompts for one step of `crop_prompts` training: for every class with at least
    DEFAULT_MIN_AREA labelled pixels, `share` of its M slots (dpseg.refine.mixed_slots) take the
    features of its ground-truth crop (masked, as pass II cuts them) from this image. With
    `detections` (B, H, W) class maps at the images' size, crops are cut from them instead of the
    labels (crop_source "prediction"). With `negatives`, that many classes without a crop (drawn by
    `generator`) take another class's crop too: any absent class, or with `nearest`
    (`similar_classes`, crop_negative_classes "similar") one of the classes whose bank prompts
    are nearest the crop's class. With `present_share` < 1, each present class keeps its crop with that
    probability (negatives may still carry it). With `image_share` < 1, only that share of the
    images (drawn by `generator`) gets crops."""
    from dpseg.refine import RefineSettings, label_maps, refine_batch, replace_prompts

    n = visual.num_classes
    size = encode_size or model.encoder_spec.image_size
    if detections is None:
        maps = label_maps(labels, n, ignore_index, tuple(images.shape[-2:]))
    else:
        maps = detections.to(labels.device).long().clone()
    if image_share < 1.0:
        chosen = torch.rand(len(images), generator=generator) < image_share
        maps[~chosen.to(maps.device)] = n  # nothing detected: that image keeps the bank's prompts
    settings = RefineSettings(int(size), merge="mix", share=share)
    refs = refine_batch(model, images, maps, settings, num_classes=n)
    if negatives > 0:
        refs = [false_detections(ref, n, negatives, generator, nearest) for ref in refs]
    if present_share < 1.0:
        refs = [missed_detections(ref, present_share, generator) for ref in refs]
    return replace_prompts(visual, refs, "mix", share)


SIMILAR_POOL = 3  # "similar" negatives: drawn among this many nearest absent classes


def similar_classes(visual) -> torch.Tensor:
    """(N, N-1) every class's other classes, nearest first: cosine of their bank prototypes
    (`VisualPrompts.prototypes`)."""
    proto = visual.prototypes()
    if proto.dim() == 3:  # per-image prompts: the bank's are the same in every image before crops
        proto = proto[0]
    similarity = proto @ proto.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argsort(dim=1, descending=True, stable=True)[:, :-1].cpu()


def false_detections(
    ref, num_classes: int, count: int, generator: torch.Generator | None, nearest: torch.Tensor | None = None
):
    """`ref` with up to `count` absent classes added, each carrying the first crop of a present
    class drawn at random: what pass II gives a class pass I wrongly detected over that region.
    The absent classes are drawn from all of them, or with `nearest` (`similar_classes`) from the
    SIMILAR_POOL absent classes nearest the crop's class."""
    from dpseg.refine import Refinement

    present = ref.classes.tolist()
    taken = set(present)
    absent = [c for c in range(num_classes) if c not in taken]
    count = min(count, len(absent))
    if not present or count == 0:
        return ref
    if nearest is None:
        picked = torch.randperm(len(absent), generator=generator)[:count]
        added = torch.tensor(sorted(absent[i] for i in picked.tolist()), dtype=torch.int64)
        sources = torch.randint(len(present), (count,), generator=generator)
    else:
        sources = torch.randint(len(present), (count,), generator=generator)
        pairs = []
        for source in sources.tolist():
            pool = [c for c in nearest[present[source]].tolist() if c not in taken][:SIMILAR_POOL]
            pick = pool[int(torch.randint(len(pool), (1,), generator=generator))]
            taken.add(pick)
            pairs.append((pick, source))
        pairs.sort()
        added = torch.tensor([c for c, _ in pairs], dtype=torch.int64)
        sources = torch.tensor([source for _, source in pairs], dtype=torch.int64)
    first_row = torch.cumsum(ref.counts, 0) - ref.counts
    rows = first_row[sources]
    return Refinement(
        torch.cat([ref.classes, added]),
        torch.cat([ref.areas, torch.zeros(count, dtype=torch.int64)]),
        torch.cat([ref.counts, torch.ones(count, dtype=torch.int64)]),
        torch.cat([ref.embedding, ref.embedding[rows]]),
        {s: torch.cat([p, p[rows]]) for s, p in ref.pooled.items()},
    )


def missed_detections(ref, share: float, generator: torch.Generator | None):
    """`ref` with each present class (area > 0; false_detections' additions have area 0) kept with
    probability `share`: the dropped ones keep the bank's prompts, as pass II leaves the classes
    pass I missed."""
    from dpseg.refine import keep_refined

    present = ref.areas > 0
    return keep_refined(ref, ~present | (torch.rand(len(ref.classes), generator=generator) < share))


def resolve_precision(value: str, gpu: bool) -> str:
    """accelerate's name for the autocast to run: "no" (fp32, SED's precision), "bf16" or "fp16"."""
    if value in ("fp32", "no"):
        return "no"
    if value == "fp16" and not gpu:
        raise UserError("--mixed-precision fp16 needs a GPU; on the CPU use fp32 or bf16")
    if value != "auto":
        return value
    if not gpu:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def cosine(total: int):
    """SED's cosine schedule without warm-up, from the base lr to zero at `total` steps."""

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    return factor


def remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_record(r: TrainSettings, plan, accelerator) -> dict:
    """What config.json's `extra` says about how the weights were made. Its paths are relative to
    the run folder, so a run folder moved or copied together with its bank still finds it."""
    from dpseg.reproducibility import environment

    bank = plan.bank
    out = Path(r.out)
    recipe = recorded_recipe(r, out)
    return {
        "recipe": recipe,
        "bank": None
        if bank is None
        else {
            "path": relative_to_run(bank.root, out),
            "generator": bank.generator,
            "settings_hash": bank.config["generator"].get("settings_hash"),
            "seed": bank.config.get("seed"),
        },
        "encoder": r.encoder,
        "encoder_weights": recipe["encoder_weights"],
        "encode_size": plan.encode_size,
        "vocabulary": {
            "name": plan.dataset.info.vocabulary,
            "subset": r.classes,
            "class_ids": plan.keep,
            "class_names": plan.class_names,
        },
        "dataset": relative_to_run(plan.dataset.info.root, out),
        "git_commit": git_commit(),
        "world_size": accelerator.num_processes,
        "environment": environment(),
    }


RUN_PATHS = ("dataset", "bank", "encoder_weights")  # recipe fields that name files or folders


def relative_to_run(path: str | os.PathLike, out: Path) -> str:
    return os.path.relpath(Path(path).resolve(), out.resolve())


def recorded_recipe(r: TrainSettings, out: Path) -> dict:
    """The recipe as a run records it: paths relative to the run folder (`out` itself is ".")."""
    recipe = r.to_dict()
    for key in RUN_PATHS:
        value = recipe.get(key)
        if value and (key != "encoder_weights" or Path(value).exists()):  # a tag or "none" stays as it is
            recipe[key] = relative_to_run(value, out)
    recipe["out"] = "."
    return recipe


def same_places(saved: dict, recorded: dict, out: Path, weights_sha256: str | None = None) -> dict:
    """`saved` with each path that names the same thing as `recorded`'s replaced by it: runs that
    recorded paths relative to the directory they were started from resume unchanged, and a
    weights file is the same weights at any path when its digest is the one the checkpoint
    recorded (the weights file it carries, say)."""
    from dpseg.clip.encoders import weights_digest

    saved = dict(saved)
    for key in RUN_PATHS:
        old, new = saved.get(key), recorded.get(key)
        if not (old and new) or old == new:
            continue
        if Path(old).resolve() == (out / new).resolve():
            saved[key] = new
        elif key == "encoder_weights" and weights_sha256 and weights_digest(out / new) == weights_sha256:
            saved[key] = new
    return saved


class MetricsLog:
    """OUT/metrics.jsonl, one JSON object a line. A resumed run first drops the lines a killed
    run wrote after its last checkpoint, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, start_step: int, active: bool):
        self.path, self.active = path, active
        if not active:
            return
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [line for line in lines if line.strip() and _step(line) <= start_step]
        if kept != lines:
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict) -> None:
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # an unreadable (torn) line is dropped


def write_loss_csv(out: Path) -> None:
    """OUT/loss.csv (step,loss,lr): the loss curve in a format `dvc plots` reads."""
    rows = ["step,loss,lr"]
    path = out / METRICS_FILE
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if "loss" in record:
            rows.append(f"{record['step']},{record['loss']},{record['lr']}")
    atomic_write_bytes(out / LOSS_CSV, ("\n".join(rows) + "\n").encode(), sync=False)


def read_metrics(out: str | os.PathLike) -> list[dict]:
    path = Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def recipe_from_params(section: dict) -> TrainSettings:
    """A params.yaml `train:` section -> TrainSettings; keys are the recipe's field names, null
    means the default, an unknown key is a one-line error."""
    section = dict(section or {})
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise UserError(f"params.yaml train: unknown keys {unknown}; known: {', '.join(sorted(known))}")
    values = {k: v for k, v in section.items() if v is not None}
    if "model_overrides" in values and not isinstance(values["model_overrides"], dict):
        raise UserError("params.yaml train.model_overrides must be a mapping of model config fields")
    for key in ("dataset", "bank", "out", "encoder_weights", "classes"):
        if key in values:
            values[key] = str(values[key])
    return TrainSettings(**values)


def train_from_params(section: dict, progress: bool = True) -> dict:
    """The DVC stage's entry: `train(recipe_from_params(params["train"]))`."""
    return train(recipe_from_params(section), progress=progress)
