"""Profiles: named sets of defaults for every pipeline stage (`profile:` in params.yaml).

A profile fills each section of params.yaml (data, clip, bank, train, eval, report); a key that
params.yaml sets explicitly (anything but null) overrides the profile's value, so

    dvc exp run -S profile=paper-b                       # the paper's ConvNeXt-B setting
    dvc exp run -S train.steps=200                       # the demo with a longer training

`demo` (the default) is the embedded offline world: synthetic `shapes` scenes, the tiny CLIP
pretrained by the `clip` stage, the `procedural` bank, CPU, minutes. `paper-b` / `paper-l` are
the paper's settings (sd15 bank at 768 px, 80 templates, ConvNeXt-B/L, COCO-Stuff, 80k
iterations, the five benchmarks); they need the weights and the raw datasets (docs/pipeline.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpseg.errors import UserError
from dpseg.registry import Registry

SECTIONS = ("data", "clip", "bank", "train", "eval", "seeds", "report")
PAPER_BENCHMARKS = ("ade-847", "pc-459", "ade-150", "pc-59", "voc-20")
CLIP_WEIGHTS = "out/clip/tiny.safetensors"  # written by the demo's clip stage


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    sections: dict[str, dict[str, Any]]
    eval_sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # set name -> EvalSettings fields
    # CPU threads every stage runs with (torch intra- and inter-op); None: torch's default. A fixed
    # count makes the CPU stages bit-identical on any machine (float sums split across threads)
    threads: int | None = None

    def defaults(self, section: str) -> dict[str, Any]:
        return copy.deepcopy(self.sections.get(section, {}))


PROFILES: Registry[Profile] = Registry("profile")

PROFILES.register(
    "demo",
    Profile(
        "demo",
        "offline default: synthetic shapes (36 seen / 12 unseen categories), tiny CLIP pretrained here, "
        "procedural bank, CPU, minutes",
        {
            # 1000 train scenes (20 s to draw): at 160 the 600 steps saw each scene 15 times and overfit
            # (docs/train.md).
            # 500 val scenes: a paired bootstrap over 48 gave intervals 16 points wide (docs/eval.md).
            # The world: the canvas is a class, and scenes are photographed under per-image conditions the
            # bank's clean, centred `procedural-studio` prompts never show (the paper's premise for pass II)
            "data": {
                "kind": "synth",
                "datasets": ["shapes"],
                "images": 1000,
                "val_images": 500,
                "background": True,
                "scene_style": "photo",
                "size": 128,
                "seed": 0,
                "src": None,
                "out": "out/data",
            },
            # 3000 steps: ~7 min on 2 cores, zero-shot 0.83 (docs/clip.md); a GPU runs them in seconds
            # (-S clip.device=cuda). Half the renders under the scenes' photo conditions:
            # a web-scale CLIP has seen photographs of its world, not renders only (docs/clip.md)
            "clip": {"enabled": True, "steps": 3000, "seed": 0, "device": "cpu", "photo_share": 0.5, "out": "out/clip"},
            "bank": {
                "generator": "procedural-studio",
                "vocab": ["shapes-background"],
                "encoder": "tiny",
                "encoder_weights": CLIP_WEIGHTS,
                "templates": 80,
                "seed": 0,
                "batch_size": 64,
                "device": "cpu",
                "out": "out/bank",
            },
            "train": {
                "dataset": "out/data/shapes",
                "bank": "out/bank",
                "classes": "seen",
                "encoder_weights": CLIP_WEIGHTS,
                # colour defines these classes: no hue jitter (docs/train.md). The tiny tower stays frozen
                # (x0): measured seen/unseen mIoU 24.7/62.2 frozen, 23.6/58.9 at x0.1, 4.2/25.0 at x1.0;
                # the 128 px scenes resized to 96 px (train and eval alike) buy 600 steps in the demo's minutes
                "steps": 600,
                "batch_size": 4,
                "crop_size": 96,
                "lr": 2e-3,
                "image_lr_multiplier": 0.0,
                "color_jitter": False,
                # the decoder meets crop prompts as pass II gives them (docs/train.md, not in the paper): on half
                # the images, half the slots of each present class and of 2 absent ones; eval then mixes likewise
                "crop_prompts": 0.5,
                "crop_negatives": 2,
                "crop_prompt_images": 0.5,
                # crop slots reach the decoder through weights of their own (docs/model.md), so the decoder can
                # tell the image's crops from the bank's prompts; chosen on held-out scenes (docs/eval.md)
                "model_overrides": {"crop_channels": True},
                "num_workers": 0,
                "log_every": 10,
                "checkpoint_every": 0,
                "out": "out/train",
            },
            "eval": {
                "sets": ["seen", "unseen"],
                "checkpoint": "out/train/checkpoint",
                "split": "val",
                "passes": 2,
                # a diagnostic beside the real pass II (ground-truth crops): the report says what share
                # of its gain the real pass II closes; never a headline number
                "oracle": True,
                "batch_size": 8,
                "num_workers": 0,
                "device": "cpu",
                # the first images' predictions, for the report's panels (image | truth | pass I | pass II)
                "save_predictions": 4,
            },
            # a second training seed beside every result (the demo's spread between seeds is several points)
            "seeds": {"extra": [1], "out": "out/seeds"},
            "report": {"title": "dpseg demo (shapes, tiny CLIP, CPU)", "panels": 4},
        },
        eval_sets={
            "seen": {"dataset": "out/data/shapes", "classes": "seen"},
            # a new dataset of this world: its own vocabulary plus its canvas, labelled as ADE labels walls and
            # sky (docs/eval.md, "The unseen set's vocabulary"); without data.background the canvas is ignored
            "unseen": {"dataset": "out/data/shapes", "classes": "unseen+background"},
        },
        threads=2,  # the 2-core machine the demo's timings were measured on
    ),
)


def _paper(name: str, encoder: str, description: str) -> Profile:
    return Profile(
        name,
        description,
        {
            "data": {"kind": "prepare", "datasets": ["coco-stuff", *PAPER_BENCHMARKS], "src": None, "out": "out/data"},
            "clip": {"enabled": False, "out": "out/clip"},
            "bank": {
                "generator": "sd15",
                "vocab": ["coco-stuff", *PAPER_BENCHMARKS],
                "encoder": encoder,
                "encoder_weights": "default",
                "templates": 80,
                "resolution": 768,
                "seed": 0,
                "batch_size": 16,
                "device": "auto",
                "dtype": "auto",
                "out": "out/bank",
            },
            "train": {
                "dataset": "out/data/coco-stuff",
                "bank": "out/bank",
                "steps": 80_000,
                "batch_size": 4,
                "crop_size": 768,
                "lr": 2e-4,
                "weight_decay": 1e-4,
                "image_lr_multiplier": 0.01,
                "mixed_precision": "fp32",  # SED's configs never turn AMP on; bf16/fp16 only when asked
                "checkpoint_every": 1000,
                "out": "out/train",
            },
            "eval": {
                "sets": list(PAPER_BENCHMARKS),
                "checkpoint": "out/train/checkpoint",
                "split": "val",
                "passes": 2,
                "batch_size": 1,
                "class_chunk": 128,
                "device": "auto",
                "save_predictions": 4,
                "precision": "fp32",
            },
            "seeds": {"extra": [], "out": "out/seeds"},  # e.g. [1]: the whole training again per seed
            "report": {"title": f"dpseg {name} (paper setting)", "panels": 4},
        },
        eval_sets={b: {"dataset": f"out/data/{b}"} for b in PAPER_BENCHMARKS},
    )


PROFILES.register("paper-b", _paper("paper-b", "convnext-b", "the paper's ConvNeXt-B setting (GPU cluster)"))
PROFILES.register("paper-l", _paper("paper-l", "convnext-l", "the paper's ConvNeXt-L setting (GPU cluster)"))


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """params.yaml as written (nested sections); one-line errors for a missing or broken file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no {path} here; run from the project root (where dvc.yaml and params.yaml are)")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None


def _overlay(base: dict[str, Any], explicit: dict[str, Any] | None) -> dict[str, Any]:
    """`base` with every non-null key of `explicit` laid over it (mappings merged key by key)."""
    out = copy.deepcopy(base)
    for key, value in (explicit or {}).items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml (as loaded) -> {"profile": name, section: resolved dict, "eval_sets": {...}}."""
    if not isinstance(params, dict):
        raise UserError("params.yaml must be a mapping with a `profile:` key and one section per stage")
    name = params.get("profile") or "demo"
    profile = PROFILES.get(str(name))
    unknown = sorted(set(params) - {"profile", "threads", *SECTIONS})
    if unknown:
        raise UserError(
            f"params.yaml: unknown top-level keys {unknown}; known: profile, threads, {', '.join(SECTIONS)}"
        )
    threads = params.get("threads")
    threads = profile.threads if threads is None else threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"params.yaml threads: a positive whole number of CPU threads (or null), got {threads!r}")
    resolved: dict[str, Any] = {"profile": profile.name, "threads": threads}
    for section in SECTIONS:
        explicit = params.get(section) or {}
        if not isinstance(explicit, dict):
            raise UserError(f"params.yaml {section}: must be a mapping of settings, got {type(explicit).__name__}")
        resolved[section] = _overlay(profile.defaults(section), explicit)
    resolved["eval_sets"] = copy.deepcopy(profile.eval_sets)
    return resolved


def eval_set(resolved: dict[str, Any], name: str) -> dict[str, Any]:
    """The EvalSettings fields of eval set `name`: the profile's definition of that set, under the
    resolved `eval` section (minus its `sets` list), out = out/eval/<name>."""
    sets = resolved["eval_sets"]
    if name not in sets:
        known = ", ".join(sets) or "none"
        raise UserError(
            f"eval set {name!r} is not defined by profile {resolved['profile']!r} (its sets: {known}); "
            f"set eval.sets in params.yaml to some of them"
        )
    section = {k: v for k, v in resolved["eval"].items() if k != "sets"}
    return {**section, **sets[name], "out": f"out/eval/{name}"}
