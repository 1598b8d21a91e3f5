"""The `bank-base` and `bank` DVC stages' build: a params.yaml `bank:` section -> BuildSettings ->
`build_bank` into `bank.out` (DVC removes that folder first, so every repro is a fresh build).

    dvc repro bank
    dvc exp run -S bank.generator=sd15 -S bank.vocab=[coco-stuff] -S bank.encoder=convnext-b ...

Defaults come from the profile (pipeline/profiles.py); a key the profile leaves out takes
BuildSettings' / GeneratorSettings' default. `python -m pipeline.stages params` prints them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bank.build import BuildSettings, build_bank
from bank.generators.base import GeneratorSettings
from dpseg.errors import UserError

# params.yaml bank keys -> the GeneratorSettings field they set; every other key is a BuildSettings field
GENERATOR_KEYS = ("model", "resolution", "steps", "guidance", "device", "dtype", "compile")
BUILD_KEYS = ("generator", "vocab", "encoder", "encoder_weights", "encode_size", "templates", "seed")
BUILD_KEYS += ("batch_size", "shard_size", "out")


def build_settings(section: dict[str, Any], progress: bool = True) -> BuildSettings:
    """A resolved `bank:` section (stage-only keys removed) -> the BuildSettings the stage runs."""
    unknown = sorted(set(section) - set(GENERATOR_KEYS) - set(BUILD_KEYS))
    if unknown:
        raise UserError(f"params.yaml bank: unknown keys {unknown}; known: {sorted(GENERATOR_KEYS + BUILD_KEYS)}")
    missing = [k for k in ("generator", "vocab", "encoder", "out") if section.get(k) is None]
    if missing:
        raise UserError(f"params.yaml bank: {', '.join(missing)} must be set (the profile or params.yaml)")
    values = {k: section[k] for k in GENERATOR_KEYS if section.get(k) is not None}
    if "compile" in values:
        values["compile"] = tuple(values["compile"])
    options = GeneratorSettings(**values)
    build = {k: section[k] for k in BUILD_KEYS if k in section and section[k] is not None}
    weights = build.get("encoder_weights")
    if weights is not None and str(weights).lower() in ("none", "random"):
        build["encoder_weights"] = None
    vocab = build["vocab"]
    build["vocab"] = list(vocab) if isinstance(vocab, (list, tuple)) else [vocab]
    build["out"] = Path(build["out"])
    for key in ("templates", "seed", "batch_size", "shard_size"):
        if key in build:
            build[key] = int(build[key])
    return BuildSettings(**build, generator_options=options, progress=progress)


def settings_view(opts: BuildSettings) -> dict[str, Any]:
    """BuildSettings as the params.yaml `bank:` section that produces it (what `params` prints)."""
    gen = opts.generator_options
    view: dict[str, Any] = {k: getattr(opts, k) for k in BUILD_KEYS}
    view.update({k: getattr(gen, k) for k in GENERATOR_KEYS})
    view["vocab"] = list(view["vocab"])
    view["compile"] = list(view["compile"])
    view["out"] = str(view["out"])
    if view["encoder_weights"] is None:
        view["encoder_weights"] = "none"
    return view


def run_bank_stage(section: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    return build_bank(build_settings(section, progress=progress))
