"""The demo's `clip` stage: pretrain the `tiny` open_clip model (both towers) on the `shapes` world.

With random weights, the text prompt of a class the segmenter never saw means nothing. This stage
plays the part of web-scale CLIP pretraining in miniature: rendered single-object images of all
48 `shapes` categories (every colour x texture x shape), captioned with the 80 CLIP templates
("a blurry photo of a red striped star."), train both towers contrastively, so that the text of
an unseen category lands near images of it and words compose.

Why not the plain CLIP loss (measured: 0.17 zero-shot accuracy after 4 CPU minutes): with 48
categories, a batch of 64 holds many pairs of the same category that InfoNCE pushes apart, and
the image tower learns slowly from one bit per pair. Instead, each image is scored against the
captions of *all* 48 categories written with its own template (a contrastive loss whose
negatives are the other categories, never the same one), and the 48 scores are also marginalised
per attribute (colour, texture, shape) so that a half-right guess is rewarded as such. Renders
come from a cache drawn once (flips and quarter turns vary them); captions are cut to their
real length. Progressive resizing (`small_fraction`) is available but off: measured, the switch
from 32 to 64 px loses most of what was learnt at 32 px.

    dpseg clip pretrain --out out/clip       # out/clip/tiny.safetensors, config.json, metrics.json
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dpseg.clip.encoders import ENCODERS, create_open_clip
from dpseg.clip.templates import TEMPLATES
from dpseg.data.shapes import COLOURS, SHAPES, SHAPES_CATEGORIES, TEXTURES, photo_conditions, render_prompt_image
from dpseg.errors import UserError
from dpseg.io import atomic_write_bytes, atomic_write_json
from dpseg.reproducibility import environment
from pipeline.provenance import git_commit

# SHAPES_CATEGORIES is the product colour x texture x shape in this order, so (48,) scores reshape
# to (colour, texture, shape) and each attribute's score is a logsumexp over the other two axes.
ATTRIBUTES: dict[str, int] = {"colour": len(COLOURS), "texture": len(TEXTURES), "shape": len(SHAPES)}
EVAL_SEED_OFFSET = 1_000_003  # held-out renders: seeds no training render uses
TIMING_KEYS = ("render_s", "train_s", "eval_s", "total_s", "train_s_per_step")


@dataclass
class ClipPretrainSettings:
    encoder: str = "tiny"
    steps: int = 3000  # ~7 min on 2 cores (docs/clip.md)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 30
    templates: int = 80  # the first K CLIP templates caption the renders (tests use a few)
    templates_per_step: int = 8  # captions per step: 48 categories x this many templates
    renders: int = 2  # cached training renders per (category, template)
    # share of those renders under the scenes' photo conditions (clutter, light, cast, blur): a CLIP that
    # has seen the world has seen photographs of it, not renders only (the bank keeps its studio look)
    photo_share: float = 0.0
    small_size: int = 32  # input size of the first `small_fraction` of steps
    small_fraction: float = 0.0  # measured: a 32 -> 64 px switch loses what 32 px learnt
    attribute_weight: float = 0.5
    eval_renders: int = 1  # held-out renders per (category, template) for zero-shot accuracy
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    device: str = "cpu"  # cpu | cuda (the demo trains on CPU; a GPU runs longer schedules in seconds)
    out: str = "out/clip"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClipPretrainSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"clip pretrain: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def check(self) -> None:
        if self.encoder != "tiny":
            raise UserError(
                f"clip pretrain trains the demo's 'tiny' encoder only, not {self.encoder!r}; "
                "larger encoders come with their own pretrained weights (--encoder-weights)"
            )
        for name in ("steps", "batch_size", "templates_per_step", "renders", "eval_renders"):
            if getattr(self, name) < 1:
                raise UserError(f"clip pretrain: {name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.templates <= len(TEMPLATES):
            raise UserError(f"clip pretrain: templates must be 1..{len(TEMPLATES)}, got {self.templates}")
        if self.templates_per_step > self.templates:
            raise UserError(
                f"clip pretrain: templates_per_step ({self.templates_per_step}) exceeds templates ({self.templates})"
            )
        if self.small_size % 32 or self.small_size < 32:
            raise UserError(f"clip pretrain: small_size must be a multiple of 32, got {self.small_size}")
        if self.device not in ("cpu", "cuda") or (self.device == "cuda" and not torch.cuda.is_available()):
            raise UserError(f"clip pretrain: device must be cpu or cuda (with a GPU present), got {self.device!r}")
        if not 0.0 <= self.photo_share <= 1.0:
            raise UserError(f"clip pretrain: photo_share is a share in [0, 1], got {self.photo_share}")
        if not 0.0 <= self.small_fraction <= 1.0:
            raise UserError(f"clip pretrain: small_fraction must be in [0, 1], got {self.small_fraction}")


# --- data ---------------------------------------------------------------------------------


def render_set(
    size: int,
    renders: int,
    seed: int,
    templates: int = len(TEMPLATES),
    progress: bool = False,
    desc: str = "render",
    photo_share: float = 0.0,
) -> np.ndarray:
    """(48, K, renders, size, size, 3) uint8: every (category, template) drawn `renders` times;
    the last round(renders * photo_share) draws of each under photo conditions (`photograph`)."""
    out = np.empty((len(SHAPES_CATEGORIES), templates, renders, size, size, 3), dtype=np.uint8)
    pairs = [(c, t, r) for c in range(len(SHAPES_CATEGORIES)) for t in range(templates) for r in range(renders)]
    for c, t, r in tqdm(pairs, desc=desc, disable=not progress, leave=False):
        out[c, t, r] = render_prompt_image(SHAPES_CATEGORIES[c], TEMPLATES[t], size, seed + r)
    return photograph(out, seed, first=renders - int(round(renders * photo_share)))


def photograph(renders: np.ndarray, seed: int, first: int = 0) -> np.ndarray:
    """A copy of a render set (48, K, R, S, S, 3) with draws `first`..R-1 of every (category,
    template) under photo conditions, each seeded by (seed, its place in the set); the set itself
    when no draw is photographed."""
    n, m, r = renders.shape[:3]
    if first >= r:
        return renders
    out = renders.copy()
    for c, t, k in itertools.product(range(n), range(m), range(first, r)):
        out[c, t, k] = photo_conditions(renders[c, t, k], seed, f"{c}/{t}/{k}")
    return out


def caption_tokens(tokenizer, templates: int = len(TEMPLATES)) -> torch.Tensor:
    """(48, K, L) tokens of every caption, cut after the longest caption's end token: the text
    tower is causal, so the tokens after a caption's end never change its embedding."""
    texts = [template.format(name) for name in SHAPES_CATEGORIES for template in TEMPLATES[:templates]]
    tokens = tokenizer(texts)
    length = int((tokens != 0).sum(1).max())
    return tokens[:, :length].reshape(len(SHAPES_CATEGORIES), templates, length)


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip CLIP.encode_text for tokens shorter than the context (same result, less work)."""
    length = tokens.shape[-1]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # the end token has the largest id
    return x @ model.text_projection


def to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> CLIP-normalised (B, 3, size, size) float."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = images.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and quarter turn per image of (B, H, W, 3): a shape's name does not
    change when it is turned, and the cached renders go further."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(2), images)
    turns = torch.randint(0, 4, (images.shape[0],), generator=generator)
    out = images.clone()
    for k in range(1, 4):
        pick = turns == k
        if pick.any():
            out[pick] = torch.rot90(images[pick], k, dims=(1, 2))
    return out


# --- loss and metric ----------------------------------------------------------------------


def attribute_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 48) category scores -> per attribute (B, values): logsumexp over the other attributes."""
    cube = logits.reshape(-1, *ATTRIBUTES.values())
    return {
        "colour": cube.logsumexp(dim=(2, 3)),
        "texture": cube.logsumexp(dim=(1, 3)),
        "shape": cube.logsumexp(dim=(1, 2)),
    }


def attribute_targets(categories: torch.Tensor) -> dict[str, torch.Tensor]:
    n_texture, n_shape = ATTRIBUTES["texture"], ATTRIBUTES["shape"]
    return {
        "colour": categories // (n_texture * n_shape),
        "texture": categories // n_shape % n_texture,
        "shape": categories % n_shape,
    }


def pretrain_loss(logits: torch.Tensor, categories: torch.Tensor, attribute_weight: float) -> torch.Tensor:
    """Cross-entropy over the 48 captions of each image's template, plus (weighted) the same for
    each attribute's marginal."""
    loss = F.cross_entropy(logits, categories)
    if attribute_weight:
        targets = attribute_targets(categories)
        marginal = attribute_logits(logits)
        loss = loss + attribute_weight * sum(F.cross_entropy(marginal[a], targets[a]) for a in ATTRIBUTES)
    return loss


def zero_shot_accuracy(image_embeddings: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose nearest class embedding (cosine) is their own class.
    image_embeddings (B, D), class_embeddings (N, D), labels (B,)."""
    scores = F.normalize(image_embeddings, dim=-1) @ F.normalize(class_embeddings, dim=-1).T
    return float((scores.argmax(dim=1) == labels).float().mean())


def class_embeddings(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(48, D): per category, the normalised mean over templates of the normalised caption
    embeddings (CLIP's prompt ensembling)."""
    n, m, length = tokens.shape
    text = F.normalize(encode_tokens(model, tokens.reshape(n * m, length)), dim=-1).reshape(n, m, -1)
    return F.normalize(text.mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot_metrics(
    model: torch.nn.Module, tokens: torch.Tensor, images: np.ndarray, size: int, batch_size: int = 256
) -> dict[str, Any]:
    """Zero-shot accuracy over the 48 categories on `images` (48, K, R, S, S, 3), overall, per
    attribute and per template (which renders lose which attribute: sketches lose colour...)."""
    model.eval()
    device = tokens.device
    classes = class_embeddings(model, tokens)
    n, m, r = images.shape[:3]
    flat = torch.from_numpy(images.reshape(n * m * r, *images.shape[3:]))
    embeddings = torch.cat(
        [
            model.encode_image(to_input(flat[i : i + batch_size].to(device), size))
            for i in range(0, len(flat), batch_size)
        ]
    )
    labels = torch.arange(n, device=device).repeat_interleave(m * r)
    predicted = (F.normalize(embeddings, dim=-1) @ classes.T).argmax(dim=1)
    correct = predicted == labels
    per_attribute = {
        a: float((attribute_targets(predicted)[a] == attribute_targets(labels)[a]).float().mean()) for a in ATTRIBUTES
    }
    per_template = correct.reshape(n, m, r).float().mean(dim=(0, 2)).cpu()
    return {
        "zero_shot_accuracy": zero_shot_accuracy(embeddings, classes, labels),
        "chance": 1 / n,
        "attribute_accuracy": per_attribute,
        "images": int(len(flat)),
        "per_template": {TEMPLATES[t]: round(float(per_template[t]), 3) for t in range(m)},
    }


# --- the stage ----------------------------------------------------------------------------


def lr_at(step: int, cfg: ClipPretrainSettings) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(cfg: ClipPretrainSettings, progress: bool = True) -> dict[str, Any]:
    """Trains, evaluates and writes OUT/tiny.safetensors, OUT/config.json, OUT/metrics.json and
    OUT/metrics.jsonl (loss per step); returns the metrics."""
    from dpseg.reproducibility import deterministic

    cfg.check()
    threads = torch.get_num_threads()
    if cfg.threads:  # a fixed thread count also fixes the float summation order (determinism)
        torch.set_num_threads(cfg.threads)
    # without it, the multi-threaded backward of the caption/slot indexing adds in another order each run
    deterministic()
    try:
        return _pretrain(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg: ClipPretrainSettings, progress: bool) -> dict[str, Any]:
    out = Path(cfg.out)
    spec = ENCODERS.get(cfg.encoder)
    size = spec.prompt_size  # the CLIP resolution: what prompt images and crops are encoded at
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # 1. the model, random init under the run's seed; the tokenised captions
    torch.manual_seed(cfg.seed)
    model, _ = create_open_clip(spec, weights=None)
    import open_clip

    tokens = caption_tokens(open_clip.get_tokenizer(spec.open_clip_model), cfg.templates).to(cfg.device)
    model.to(cfg.device)

    # 2. the cached training renders (and the held-out ones, drawn with other seeds)
    t0 = time.perf_counter()
    train_images = torch.from_numpy(
        render_set(size, cfg.renders, cfg.seed, cfg.templates, progress, "render train", cfg.photo_share)
    )
    eval_seed = cfg.seed + EVAL_SEED_OFFSET
    eval_images = render_set(size, cfg.eval_renders, eval_seed, cfg.templates, progress, "render eval")
    # the same held-out renders under photo conditions: how much of the CLIP survives a camera
    eval_photo = photograph(eval_images, eval_seed)
    timings["render_s"] = time.perf_counter() - t0

    # 3. optimiser: AdamW, no decay on norms, biases, embeddings and the logit scale
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        fused=True,
    )  # one kernel per step instead of one per tensor: 25 -> 5 ms on 2 cores
    generator = torch.Generator().manual_seed(cfg.seed)
    n_cat, n_tpl, n_ren = train_images.shape[:3]
    small_steps = int(round(cfg.steps * cfg.small_fraction))
    history = []

    # 4. the loop: per step K templates, B images of them, scored against 48 x K captions
    model.train()
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="clip pretrain", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        templates = torch.randperm(n_tpl, generator=generator)[: cfg.templates_per_step]
        slot = torch.randint(0, len(templates), (cfg.batch_size,), generator=generator)
        categories = torch.randint(0, n_cat, (cfg.batch_size,), generator=generator)
        renders = torch.randint(0, n_ren, (cfg.batch_size,), generator=generator)
        # indices come from the CPU generator (same draws on any device); the batch moves afterwards
        images = augment(train_images[categories, templates[slot], renders], generator).to(cfg.device)
        categories, templates, slot = categories.to(cfg.device), templates.to(cfg.device), slot.to(cfg.device)
        step_size = min(cfg.small_size, size) if step < small_steps else size

        image_emb = F.normalize(model.encode_image(to_input(images, step_size)), dim=-1)
        caption = tokens[:, templates].reshape(-1, tokens.shape[-1])
        text_emb = F.normalize(encode_tokens(model, caption), dim=-1).reshape(n_cat, len(templates), -1)
        # logits[b, c] = scale * <image b, caption of category c in image b's template>
        logits = model.logit_scale.exp() * torch.einsum("bd,cbd->bc", image_emb, text_emb[:, slot])
        loss = pretrain_loss(logits, categories, cfg.attribute_weight)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        history.append({"step": step, "loss": round(loss.item(), 5), "lr": lr_at(step, cfg), "size": step_size})
    timings["train_s"] = time.perf_counter() - t0

    # 5. zero-shot accuracy on the held-out renders, then the artifacts (weights first, atomically)
    t0 = time.perf_counter()
    metrics = zero_shot_metrics(model, tokens, eval_images, size)
    photo = zero_shot_metrics(model, tokens, eval_photo, size)
    metrics["photo"] = {k: photo[k] for k in ("zero_shot_accuracy", "attribute_accuracy")}
    timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    metrics.update(
        {
            "steps": cfg.steps,
            "final_loss": history[-1]["loss"],
            "threads": torch.get_num_threads(),
            **{k: round(v, 2) for k, v in timings.items()},
            "train_s_per_step": round(timings["train_s"] / cfg.steps, 4),
        }
    )
    metrics["environment"] = environment()
    write_outputs(model, cfg, spec, metrics, history, out)
    return metrics


def weights_path(out: str | Path, encoder: str = "tiny") -> Path:
    return Path(out) / f"{encoder}.safetensors"


def write_outputs(
    model: torch.nn.Module, cfg: ClipPretrainSettings, spec, metrics: dict, history: list[dict], out: Path
) -> None:
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {
        "config": asdict(cfg),
        "encoder": spec.to_dict(),
        "open_clip_model": spec.open_clip_model,
        "categories": list(SHAPES_CATEGORIES),
        "templates": len(TEMPLATES),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "environment": environment(),
    }
    atomic_write_bytes(weights_path(out, cfg.encoder), save(state, metadata={"config": json.dumps(config)}))
    atomic_write_json(out / "config.json", config)
    atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
    # metrics.json stays short and identical across reruns (`dvc metrics show`): the per-template
    # accuracy and the wall-clock timings go to their own files
    atomic_write_json(out / "templates.json", metrics["per_template"])
    atomic_write_json(out / "timings.json", {k: metrics[k] for k in TIMING_KEYS if k in metrics})
    kept = {k: v for k, v in metrics.items() if k != "per_template" and k not in TIMING_KEYS}
    atomic_write_json(out / "metrics.json", kept)


def pretrain_from_params(params: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """The DVC stage's entry: `params` is the resolved `clip` section of params.yaml."""
    values = {k: v for k, v in params.items() if k != "enabled"}
    return pretrain(ClipPretrainSettings.from_dict(values), progress=progress)


def main() -> None:  # `python -m pipeline.clip.pretrain [key=value ...]` (ClipPretrainSettings fields)
    import sys

    overrides = dict(arg.split("=", 1) for arg in sys.argv[1:])
    base = ClipPretrainSettings()
    typed = {k: type(getattr(base, k))(v) for k, v in overrides.items()}
    print(json.dumps(pretrain(ClipPretrainSettings(**typed), progress=os.isatty(2)), indent=1))


if __name__ == "__main__":
    main()
