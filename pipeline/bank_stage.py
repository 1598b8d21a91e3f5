"""The `bank` DVC stage: builds the bank that `params.yaml: bank` describes into `bank.out`
(DVC removes that folder first, so every repro is a fresh, complete build).

    dvc repro bank
    dvc exp run -S bank.generator=sd15 -S bank.vocab=[coco-stuff] -S bank.encoder=convnext-b ...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from bank.build import BuildOptions, build_bank
from bank.generators.base import GeneratorOptions

DEFAULTS: dict[str, Any] = {
    "generator": "procedural",
    "vocab": ["shapes"],
    "encoder": "tiny",
    "encoder_weights": "none",
    "encode_size": None,
    "templates": 4,
    "resolution": None,
    "steps": None,
    "guidance": None,
    "model": None,
    "seed": 0,
    "batch_size": 16,
    "shard_size": 256,
    "device": "auto",
    "dtype": "auto",
    "compile": [],
    "out": "out/bank",
}


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    params = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(params.get("bank", {})) - set(DEFAULTS)
    if unknown:
        from dpseg.errors import UserError

        raise UserError(f"params.yaml bank: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **params.get("bank", {})}


def run_bank_stage(params: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    weights = None if str(params["encoder_weights"]).lower() in ("none", "random") else params["encoder_weights"]
    vocab = params["vocab"] if isinstance(params["vocab"], list) else [params["vocab"]]
    target = Path(params["out"])
    options = GeneratorOptions(
        model=params["model"],
        resolution=params["resolution"],
        steps=params["steps"],
        guidance=params["guidance"],
        device=params["device"],
        dtype=params["dtype"],
        compile=tuple(params["compile"]),
    )
    opts = BuildOptions(
        out=target,
        generator=params["generator"],
        vocab=vocab,
        encoder=params["encoder"],
        encoder_weights=weights,
        encode_size=params["encode_size"],
        templates=int(params["templates"]),
        seed=int(params["seed"]),
        batch_size=int(params["batch_size"]),
        shard_size=int(params["shard_size"]),
        generator_options=options,
        progress=progress,
    )
    return build_bank(opts)


def main(argv: list[str] | None = None) -> None:
    from dpseg.errors import UserError, error_line

    argv = sys.argv[1:] if argv is None else argv
    try:
        run_bank_stage(load_params(argv[0] if argv else "params.yaml"))
    except (UserError, OSError) as err:
        print(f"Error: {error_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
