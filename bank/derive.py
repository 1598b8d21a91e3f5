"""`dpseg bank derive`: a new bank from an existing one's images (no regeneration), re-encoded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bank.build import BuildSettings, build_bank
from bank.encode import PromptEncoder, encode_bank
from bank.generators.base import GeneratorSettings
from bank.generators.noise import NoiseGenerator
from bank.runtime import distributed_state, rank_device
from bank.store import BankStore


def derive_noise_bank(
    source: str | Path,
    ratio: float,
    out: str | Path,
    encoders: Sequence[str] | None = None,
    encoder_weights: str | None = "source",
    batch_size: int = 32,
    shard_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    generator = NoiseGenerator(source, ratio)
    config = generator.source.read_config()
    encoders = list(encoders or config.get("encoders", {}))
    state = distributed_state(device)
    device = rank_device(state, device)

    def weights(name: str):  # "source": the weights the source bank's features were made with
        return (
            config["encoders"].get(name, {}).get("weights", "default")
            if encoder_weights == "source"
            else encoder_weights
        )

    def sizes(name: str) -> list:  # the source's encode sizes of that encoder (its default size if it has none)
        return config["encoders"].get(name, {}).get("encode_sizes") or [None]

    groups = [(name, size) for name in encoders for size in sizes(name)]
    first = PromptEncoder(groups[0][0], weights(groups[0][0]), device, groups[0][1])
    opts = BuildSettings(
        out=Path(out),
        generator=generator.id,
        vocab=[f"bank:{generator.source.root}"],
        encoder=first.name,
        encoder_weights=weights(first.name),
        encode_size=first.encode_size,
        templates=int(config["templates"]),
        seed=int(config["seed"]),
        batch_size=batch_size,
        shard_size=shard_size,
        generator_options=GeneratorSettings(device=device),
        progress=progress,
    )
    try:
        report = build_bank(
            opts, generator=generator, encoder=first, state=state, categories=list(config["categories"])
        )
    finally:
        generator.close()
    if state.is_main_process:
        store = BankStore(out)
        with store.lock():
            derived = store.read_config()
            derived["derived_from"] = {"bank": str(generator.source.root), **generator.settings}
            store.write_config(derived)
    report["encoded"] = [
        encode_bank(out, e, weights(e), device, batch_size, progress, state, encode_size=size) for e, size in groups[1:]
    ]
    return report
