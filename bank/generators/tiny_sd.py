"""`tiny-sd`: a tiny random SD1.5-topology pipeline, built from config once, saved as a diffusers
directory and loaded through exactly the `sd15` loading code. For tests and offline runs."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from bank.generators.base import GENERATORS, GeneratorSettings, pick
from bank.generators.sd15 import SD15Generator
from bank.generators.sd_configs import TINY_TEXT, TINY_UNET, TINY_VAE, build_sd_pipeline

VERSION = "tiny-sd-v1"  # bump when the configs above change: it is the weights' identity


def cache_dir() -> Path:
    return Path(os.environ.get("DPSEG_CACHE", Path.home() / ".cache" / "dpseg"))


def ensure_tiny_sd(root: Path | None = None) -> Path:
    """Saves the pipeline once (atomically: a complete directory or none)."""
    target = (root or cache_dir()) / VERSION
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{VERSION}.{uuid.uuid4().hex}"
    build_sd_pipeline(TINY_UNET, TINY_VAE, TINY_TEXT, seed=0).save_pretrained(tmp, safe_serialization=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process won the race: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@GENERATORS.register("tiny-sd")
class TinySDGenerator(SD15Generator):
    id = "tiny-sd"
    defaults = dict(SD15Generator.defaults, model=VERSION, resolution=64, steps=4, safety_checker=False)

    @classmethod
    def create(cls, options: GeneratorSettings):
        model = options.model
        if model is None or model == VERSION:
            return cls.load(options, str(ensure_tiny_sd()), model_id=VERSION)
        return cls.load(options, pick(model, VERSION))
