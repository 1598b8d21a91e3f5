"""`dpseg bench bank`: what the bank costs around the generator, measured in one run.

1. overhead: `bank build` time per image / bare generator time per image, same requests, same
   batch size, same (already warm) pipeline; optionally with a torch.compiled UNet (+VAE), both
   against the same plain bare loop. The bare loop is the diffusers pipeline call itself
   (`pipe(prompts, generator=[one per image], output_type="pt")`), nothing else.
2. encode throughput of `bank encode` (read shard, decode PNG, prompt tower, write part, merge).
3. prototype read: `Bank.prototypes` for 1,000 categories x 80 templates at ConvNeXt-B sizes.
4. dedup ratio: distinct prompts over the six public vocabularies / sum of per-vocabulary prompts.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench.common import sync

PUBLIC_VOCABULARIES = ("coco-stuff", "ade-150", "ade-847", "pc-59", "pc-459", "voc-20")
GOALS = {"overhead_ratio": "<= 1.05", "prototype_read_s": "< 1.0 (1,000 x 80)"}


def _timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def dedup_figure() -> dict[str, Any]:
    from bank.plan import resolve_categories
    from dpseg.clip.templates import NUM_TEMPLATES

    unique, counts = resolve_categories(PUBLIC_VOCABULARIES)
    total = sum(counts.values())
    return {
        "vocabularies": counts,
        "class_names": total,
        "distinct_primary_names": len(unique),
        "prompts_sum": total * NUM_TEMPLATES,
        "prompts_unique": len(unique) * NUM_TEMPLATES,
        "ratio": round(len(unique) / total, 4),
    }


def prototype_read_figure(
    categories: int = 1000, templates: int = 80, encoder: str = "convnext-b", repeats: int = 3
) -> dict[str, Any]:
    """Writes random float16 features at the encoder's real sizes into a bank layout, then reads
    every category in a shuffled vocabulary order with the reader API."""
    from bank.merge import open_features_group
    from bank.reader import Bank
    from bank.store import SCHEMA_VERSION, BankStore, feature_group
    from dpseg.clip.encoders import ENCODERS, encoder_dims
    from dpseg.clip.image import PROMPT_STRIDES

    embed, all_channels = encoder_dims(encoder)
    channels = {str(s): all_channels[s] for s in PROMPT_STRIDES}
    root = Path(tempfile.mkdtemp(prefix="dpseg-bench-read-"))
    try:
        store = BankStore(root)
        names = [f"category {i}" for i in range(categories)]
        size = ENCODERS.get(encoder).image_size
        info = {
            "encoder": encoder,
            "weights": "random",
            "embed_dim": embed,
            "channels": channels,
            "encode_size": size,
            "prompt_size": size,
        }
        config = {
            "schema": SCHEMA_VERSION,
            "generator": {"id": "synthetic", "settings": {}, "settings_hash": "0"},
            "seed": 0,
            "categories": names,
            "templates": templates,
            "encoders": {encoder: {**info, "encode_sizes": [size]}},
        }
        store.write_config(config)
        group, arrays = open_features_group(store, feature_group(encoder, size), info, config, categories, templates)
        rng = np.random.default_rng(0)
        for name, arr in arrays.items():
            arr[:] = True if name == "valid" else rng.standard_normal(arr.shape, dtype=np.float32).astype(np.float16)
        group.attrs.update(
            {
                "encoder": info,
                "encode_size": size,
                "generator": config["generator"],
                "templates": templates,
                "categories": names,
                "schema": SCHEMA_VERSION,
            }
        )
        order = [names[i] for i in rng.permutation(categories)]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            protos = Bank(root).prototypes(order, encoder)
            times.append(time.perf_counter() - start)
        assert protos.embedding.shape == (categories, templates, embed)
        size_mb = sum(int(np.prod(a.shape)) * 2 for n, a in arrays.items() if n != "valid") / 2**20
        return {
            "categories": categories,
            "templates": templates,
            "encoder_dims": [embed, *channels.values()],
            "float16_mb": round(size_mb, 1),
            "first_s": round(times[0], 4),
            "best_s": round(min(times), 4),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def encode_figure(
    bank_dir: Path,
    encoder: str,
    sizes: Sequence[int],
    batch_size: int,
    workers: int | None,
    device: str,
    encoder_weights: str | None = None,
) -> list[dict[str, Any]]:
    """`bank encode` of every stored image of `bank_dir` at each encode size: the pipeline (tar
    read + PNG decode in workers + tower + parts on a thread), then the one merge, timed apart;
    beside it the tower alone on the same batches held in device memory (what the hardware gives)."""
    from bank.encode import PromptEncoder, encode_shards, missing_parts, record_encoder
    from bank.merge import merge
    from bank.store import BankStore

    store = BankStore(bank_dir)
    rows = []
    for size in sizes:
        enc = PromptEncoder(encoder, encoder_weights, device, size)
        for folder in ("staging", "features.zarr"):  # every stored image is encoded again
            shutil.rmtree(store.root / folder / enc.group, ignore_errors=True)
        shards = missing_parts(store, enc.group)
        x = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, device=device)
        for _ in range(2):  # warm-up: kernel selection, allocator
            enc(x)
        tower_s = _timed(lambda e=enc, x=x: [e(x) for _ in range(3)], device) / 3
        done: dict = {}
        encode_s = _timed(
            lambda e=enc, d=done, t=shards: d.update(n=encode_shards(store, e, t, batch_size, False, workers)), device
        )
        images = done["n"]
        with store.lock():
            config = store.read_config()
            record_encoder(config, enc.info)
            store.write_config(config)
        merge_s = _timed(lambda: merge(store), device)
        rows.append(
            {
                "encode_size": size,
                "images": images,
                "batch_size": batch_size,
                "workers": workers,
                "encode_s": round(encode_s, 4),
                "merge_s": round(merge_s, 4),
                "images_per_s": round(images / (encode_s + merge_s), 2),
                "images_per_s_without_merge": round(images / encode_s, 2),
                "tower_only_images_per_s": round(batch_size / tower_s, 2),
            }
        )
    return rows


def bench_encode(
    encoder: str = "tiny",
    sizes: Sequence[int] = (64,),
    images: int = 64,
    resolution: int = 64,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "cpu",
    encoder_weights: str | None = None,
) -> dict[str, Any]:
    """Re-encoding throughput alone: a procedural bank of `images` PNGs at `resolution` (what
    SD would store; the generator does not matter to re-encoding), re-encoded with `encoder`."""
    from bank.build import BuildSettings, build_bank
    from bank.generators.base import GeneratorSettings
    from bank.runtime import distributed_state, resolve_device

    device = resolve_device(device)
    distributed_state(device)
    work = Path(tempfile.mkdtemp(prefix="dpseg-bench-encode-"))
    try:
        templates = 8
        categories = max(1, -(-images // templates))
        names = work / "names.txt"
        names.write_text("".join(f"bench object {i}\n" for i in range(categories)))
        build_bank(
            BuildSettings(
                out=work / "bank",
                generator="procedural",
                vocab=[str(names)],
                encoder="tiny",
                encoder_weights=None,
                encode_size=32,
                templates=templates,
                batch_size=64,
                shard_size=256,
                progress=False,
                generator_options=GeneratorSettings(resolution=resolution),
            )
        )
        rows = encode_figure(work / "bank", encoder, sizes, batch_size, workers, device, encoder_weights)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "bench": "bank-encode",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "encoder": encoder,
        "image_resolution": resolution,
        "encode": rows,
        "goals": {"convnext-b at 320": ">= 1000 images/s", "convnext-b at 768": ">= 250 images/s"},
    }


def overhead_figure(
    generator, encoder, batch_size: int, batches: int, device: str, work: Path, tag: str, rounds: int = 2
) -> dict[str, Any]:
    """Bare pipeline calls vs `build_bank` over the same number of new entries, same batch size;
    `rounds` alternations of (bare, bank), the fastest of each kept."""
    from bank import checks
    from bank.build import BuildSettings, build_bank
    from bank.generators.base import GeneratorSettings, Request
    from bank.plan import plan_entries

    n = batch_size * batches  # `batches` categories x `batch_size` templates: one batch per category
    categories = [f"bench object {tag} {i}" for i in range(batches)]
    entries = plan_entries(categories, batch_size, generator.id, generator.settings_hash, 0)
    requests = [Request(e.prompt, e.seed, e.category, e.template) for e in entries]
    call = getattr(generator, "pipe", None)
    warm: dict = {}
    # warm-up (and compilation) of both models, reported apart from the steady state
    warmup_s = _timed(lambda: warm.update(out=generator.generate(requests[:batch_size])), device)
    _timed(lambda: encoder(checks.to_uint8(warm["out"].images)), device)

    def bare():
        for i in range(0, n, batch_size):
            chunk = requests[i : i + batch_size]
            if call is not None:
                call(**generator.call_kwargs(chunk))  # the diffusers loop itself
            else:
                generator.generate(chunk)

    bare_times, bank_times = [], []
    for r in range(rounds):
        bare_times.append(_timed(bare, device))
        out = work / f"bank-{tag}-{r}"  # a new bank each round: all n entries are made
        opts = BuildSettings(
            out=out,
            generator=generator.id,
            vocab=[f"bench:{tag}"],
            encoder=encoder.name,
            templates=batch_size,
            batch_size=batch_size,
            shard_size=256,
            progress=False,
            generator_options=GeneratorSettings(device=device),
        )
        bank_times.append(
            _timed(lambda o=opts: build_bank(o, generator=generator, encoder=encoder, categories=categories), device)
        )
    bare_s, bank_s = min(bare_times), min(bank_times)
    return {
        "batch_size": batch_size,
        "images": n,
        "bare_s_per_image": round(bare_s / n, 5),
        "bank_s_per_image": round(bank_s / n, 5),
        "ratio": round(bank_s / bare_s, 4),
        "warmup_s": round(warmup_s, 3),
        "rounds": rounds,
        "bare_s_all": [round(t, 4) for t in bare_times],
        "bank_s_all": [round(t, 4) for t in bank_times],
        "bank": str(out),
    }


def bench_bank(
    generator: str = "tiny-sd",
    device: str = "cpu",
    dtype: str = "auto",
    resolution: int | None = None,
    steps: int | None = None,
    batch_sizes: Sequence[int] = (4,),
    batches: int = 4,
    compile: Sequence[str] = (),
    compiled_batch_sizes: Sequence[int] | None = None,
    encoder: str = "tiny",
    encoder_weights: str | None = None,
    read_categories: int = 1000,
    read_templates: int = 80,
    rounds: int = 2,
    progress: bool = True,
    encode_batch_size: int = 32,
    encode_workers: int | None = None,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    import bank.build  # noqa: F401  (imports are process start-up, not build time)
    from bank.encode import PromptEncoder, encode_bank
    from bank.generators.base import GeneratorSettings, create_generator
    from bank.generators.diffusion import compile_modules
    from bank.runtime import distributed_state, resolve_device

    device = resolve_device(device)
    distributed_state(device)
    options = GeneratorSettings(resolution=resolution, steps=steps, device=device, dtype=dtype)
    gen = create_generator(generator, options)
    enc = PromptEncoder(encoder, encoder_weights, device)
    work = Path(tempfile.mkdtemp(prefix="dpseg-bench-bank-"))
    result: dict[str, Any] = {
        "bench": "bank",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "generator": gen.describe(),
        "encoder": enc.info,
        "batches": batches,
    }
    try:
        cases = [(b, ()) for b in batch_sizes]
        if compile:
            cases += [(b, tuple(compile)) for b in (compiled_batch_sizes or [max(batch_sizes)])]
        plain_bare, rows, compiled = {}, [], False
        for b, modules in tqdm(cases, desc="bench bank", unit="case", disable=not progress):
            if modules and not compiled:
                compile_modules(gen.pipe, modules)
                compiled = True
                gen.runtime = {**gen.runtime, "compile": list(modules)}
            row = overhead_figure(gen, enc, b, batches, device, work, f"b{b}-{'-'.join(modules) or 'plain'}", rounds)
            row["compile"] = list(modules)
            if not modules:
                plain_bare[b] = row["bare_s_per_image"]
            elif b in plain_bare:  # the compiled bank against the plain diffusers loop
                row["speedup_vs_plain_bare"] = round(plain_bare[b] / row["bank_s_per_image"], 4)
            rows.append(row)
        result["overhead"] = rows
        first = rows[[r["batch_size"] for r in rows].index(max(batch_sizes))]
        result["overhead_ratio"] = first["ratio"]
        # 2. encode throughput: a second features group from the stored images of that bank
        bank_dir = Path(first["bank"])
        shutil.rmtree(bank_dir / "staging" / enc.group)  # encode everything again, from the stored images
        shutil.rmtree(bank_dir / "features.zarr" / enc.group)
        encode_s = _timed(
            lambda: encode_bank(
                bank_dir,
                encoder,
                encoder_weights,
                device,
                encode_batch_size,
                False,
                encoder=enc,
                workers=encode_workers,
            ),
            device,
        )
        from bank.inspection import info

        images = info(bank_dir)["entries"]
        result["encode"] = {
            "images": images,
            "seconds": round(encode_s, 4),
            "images_per_s": round(images / encode_s, 2),
            "batch_size": encode_batch_size,
            "workers": encode_workers,
            "note": "re-encodes every stored image with the loaded prompt tower: "
            "tar read + PNG decode (worker processes) + tower + parts (a thread) + merge",
        }
        result["encode_images_per_s"] = result["encode"]["images_per_s"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in result["overhead"]:
        row.pop("bank")
    # 3. prototype read, 4. dedup
    result["prototype_read"] = prototype_read_figure(read_categories, read_templates)
    result["prototype_read_s"] = result["prototype_read"]["best_s"]
    result["dedup"] = dedup_figure()
    result["dedup_ratio"] = result["dedup"]["ratio"]
    result["goals"] = GOALS
    return result


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.bench.bank ...`: the same as `dpseg bench bank`, for machines without
    the CLI's dependencies (typer); same option names."""
    import argparse
    import json

    from dpseg.io import atomic_write_json

    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.bank", description=__doc__.splitlines()[0])
    p.add_argument("--generator", default="tiny-sd")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--resolution", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-sizes", type=ints, default=[4])
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", default="")
    p.add_argument("--compiled-batch-sizes", type=ints, default=[])
    p.add_argument("--encoder", default="tiny")
    p.add_argument("--encoder-weights", default="none")
    p.add_argument("--encode-batch-size", type=int, default=32)
    p.add_argument("--encode-workers", type=int, default=-1, help="-1: the default (cores less one, at most 8)")
    p.add_argument("--encode-only", action="store_true", help="only re-encoding throughput (no generator)")
    p.add_argument("--encode-sizes", type=ints, default=[], help="encode sizes (default: the encoder's input size)")
    p.add_argument("--encode-images", type=int, default=1024)
    p.add_argument("-o", "--out", default=None)
    a = p.parse_args(argv)
    weights = None if a.encoder_weights.lower() in ("none", "random") else a.encoder_weights
    workers = None if a.encode_workers < 0 else a.encode_workers
    if a.encode_only:
        from dpseg.clip.encoders import ENCODERS

        result = bench_encode(
            a.encoder,
            a.encode_sizes or [ENCODERS.get(a.encoder).image_size],
            a.encode_images,
            a.resolution or 768,
            a.encode_batch_size,
            workers,
            a.device,
            weights,
        )
        if a.out:
            atomic_write_json(a.out, result)
        print(json.dumps(result, indent=2))
        return
    result = bench_bank(
        a.generator,
        a.device,
        a.dtype,
        a.resolution or None,
        a.steps,
        a.batch_sizes,
        a.batches,
        tuple(c for c in a.compile.split(",") if c),
        a.compiled_batch_sizes or None,
        a.encoder,
        weights,
        rounds=a.rounds,
        encode_batch_size=a.encode_batch_size,
        encode_workers=workers,
    )
    if a.out:
        atomic_write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
