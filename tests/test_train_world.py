"""Helpers (no tests here) for the train tests: a tiny `shapes` dataset (64 px) and a procedural
bank (tiny random encoder, 2 templates) for a few seen classes, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dpseg.data import shapes

REPO = Path(__file__).resolve().parents[1]
CLASS_IDS = shapes.SEEN_IDS[:4]  # the bank holds these; training on 'seen' (36 classes) must be refused
CLASSES = ",".join(str(i) for i in CLASS_IDS)


_WORLD: dict[str, tuple[Path, Path]] = {}


def shared_world(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, bank), built once per test session whichever module asks first."""
    if "world" not in _WORLD:
        _WORLD["world"] = build_world(tmp_path_factory.mktemp("train-world"))
    return _WORLD["world"]


def build_world(root: Path) -> tuple[Path, Path]:
    from bank.build import BuildSettings, build_bank
    from dpseg.data.synth import write_shapes_benchmark

    data, bank = root / "data", root / "bank"
    write_shapes_benchmark(data, images=8, size=64, val_images=4, progress=False)
    names = root / "names.txt"
    names.write_text("".join(shapes.SHAPES_CATEGORIES[i] + "\n" for i in CLASS_IDS))
    build_bank(
        BuildSettings(
            out=bank,
            generator="procedural",
            vocab=[str(names)],
            encoder="tiny",
            encoder_weights=None,
            encode_size=64,
            templates=2,
            batch_size=8,
            progress=False,
        )
    )
    return data, bank


def recipe(data: Path, bank: Path, out: Path, **overrides):
    from pipeline.train.loop import TrainSettings

    base = dict(
        dataset=str(data),
        bank=str(bank),
        out=str(out),
        classes=CLASSES,
        steps=12,
        batch_size=2,
        crop_size=64,
        encode_size=64,  # the bank's only size, below tiny's 128 px input: given explicitly
        lr=1e-3,
        image_lr_multiplier=1.0,
        num_workers=0,
        log_every=1,
        checkpoint_every=4,
    )
    return TrainSettings(**{**base, **overrides})


def flags(r) -> list[str]:
    """The `dpseg train` flags that give recipe `r`."""
    import dataclasses

    out = []
    for f in dataclasses.fields(r):
        value = getattr(r, f.name)
        if value is None or f.name == "model_overrides":
            continue
        if isinstance(value, bool):
            out.append(f"--{'' if value else 'no-'}{f.name.replace('_', '-')}")
        else:
            out += [f"--{f.name.replace('_', '-')}", str(value)]
    return out


def run_cli(args: list[str], env: dict | None = None, launch: list[str] | None = None, timeout: int = 300):
    """`dpseg ARGS` in a fresh process (optionally under `accelerate launch`), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    prefix = (
        [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "cli.main"]
        if launch
        else [sys.executable, "-m", "cli.main"]
    )
    return subprocess.run(prefix + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
