"""`dpseg bank build`: generate, check, encode and store every missing entry of a bank.

`_build` reads top to bottom: 1 settings -> 2 plan -> 3 repair, what is durable -> 4 split ->
5 recover features -> 6 generate/check/retry/encode/write (the loop, `generate_entries`) ->
7 the bank's other features groups -> 8 merge. Every entry has
its own seed (one torch.Generator per image), so its image does not depend on the batch size,
the number of ranks or which rank made it; an entry counts once its shard (image + metadata)
and its feature part are on disk, so a run killed at any point resumes where it stopped."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bank import checks
from bank.encode import PromptEncoder, check_encoder_compatible, encode_shards, missing_parts, record_encoder
from bank.generators.base import Generator, GeneratorSettings, Request, create_generator
from bank.merge import merge, read_manifest
from bank.plan import Entry, in_job_shard, plan_entries, resolve_categories, retry_seed
from bank.repair import repair
from bank.runtime import distributed_state, rank_device
from bank.store import SCHEMA_VERSION, BankStore, scan_shard, shard_number
from bank.writer import BackgroundWriter
from dpseg.errors import UserError
from dpseg.reproducibility import environment


@dataclass
class BuildSettings:
    out: Path
    generator: str
    vocab: Sequence[str]
    encoder: str
    encoder_weights: str | None = "default"
    encode_size: int | None = None  # None: the encoder's segmentation input size (768 for convnext-b/l)
    templates: int = 80
    seed: int = 0
    batch_size: int = 8
    shard_size: int = 256
    shard_index: int = 0
    num_shards: int = 1
    retries: int = checks.RETRIES
    generator_options: GeneratorSettings = field(default_factory=GeneratorSettings)
    progress: bool = True


def build_bank(
    opts: BuildSettings,
    generator: Generator | None = None,
    encoder: PromptEncoder | None = None,
    state=None,
    categories: list[str] | None = None,
) -> dict[str, Any]:
    """Builds (or resumes) the bank at `opts.out`; `generator`/`encoder` may be passed in already
    loaded (benchmarks, derived banks)."""
    if not 0 <= opts.shard_index < opts.num_shards:
        raise UserError(f"--shard-index must be in [0, {opts.num_shards}), got {opts.shard_index}")
    for name, value in (("--batch-size", opts.batch_size), ("--shard-size", opts.shard_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if categories is None:
        categories, _ = resolve_categories(opts.vocab)
    check_out_folder(Path(opts.out))
    state = state or distributed_state(opts.generator_options.device)
    device = rank_device(state, opts.generator_options.device)
    store = BankStore(opts.out)
    with store.build_lock(opts.shard_index, opts.num_shards, state.process_index, state.num_processes):
        return _build(opts, store, generator, encoder, state, device, categories)


def _build(opts: BuildSettings, store: BankStore, generator, encoder, state, device: str, categories: list[str]):
    # 1. settings: the generator and encoder, and the bank they must match
    if generator is None:
        _check_resolution(opts.generator, opts.generator_options.resolution)  # before loading any weights
        generator = create_generator(opts.generator, _with_device(opts.generator_options, device))
    if encoder is None:
        encoder = PromptEncoder(opts.encoder, opts.encoder_weights, device, opts.encode_size)
    _open_bank(store, generator, encoder, opts, categories)
    # 2. plan: every (category, template) entry of this build, with its seed and key
    planned = plan_entries(categories, opts.templates, generator.id, generator.settings_hash, opts.seed)
    # 3. repair what a crash, a full disk or a careless hand damaged (bank/repair.py), then see
    #    what is durable: shards (images, failures) and feature parts for this encoder
    repaired = None
    if state.is_main_process:
        with store.lock():
            repaired = repair(store)
    state.wait_for_everyone()
    durable = _durable_keys(store)
    missing_features = [s for s in store.shards() if store.part_keys(encoder.group, s) is None]
    state.wait_for_everyone()  # nobody writes before every rank has looked
    # 4. split: job arrays by entry key (no rendezvous), then ranks by position
    todo = [e for e in planned if e.key not in durable and in_job_shard(e.key, opts.shard_index, opts.num_shards)]
    mine = todo[state.process_index :: state.num_processes]
    recover = [s for s in missing_features if shard_number(s) % opts.num_shards == opts.shard_index]
    recover = recover[state.process_index :: state.num_processes]
    show = opts.progress and state.is_main_process
    # 5. shards whose images are durable but whose features are not (killed in between): encode them
    recovered = encode_shards(store, encoder, recover, opts.batch_size, show) if recover else 0
    # 6. generate the rest
    started = time.time()
    stats = generate_entries(store, generator, encoder, mine, opts, state.process_index, show)
    stats["recovered_images"] = recovered
    # 7. the bank's other features groups (other encoders or sizes) get the new shards too, so a
    #    repaired bank is whole for every group it had, not only for this build's encoder
    state.wait_for_everyone()
    stats["other_groups_encoded"] = _encode_other_groups(store, encoder.group, opts, device, state, show)
    state.wait_for_everyone()
    if state.num_processes > 1:  # totals over all ranks
        from accelerate.utils import gather_object

        per_rank = gather_object([stats])
        stats = {k: sum(s[k] for s in per_rank) for k in stats}
    # 8. merge into manifest.parquet and features.zarr (one process; the lock serialises job arrays)
    report = {
        "bank": str(store.root),
        "planned": len(planned),
        "already_done": len(planned) - len(todo),
        "todo": len(todo),
        "ranks": state.num_processes,
        "seconds": round(time.time() - started, 3),
        **stats,
    }
    if state.is_main_process:
        report["repaired"] = repaired
        report["merge"] = merge(store)
    return report


def _encode_other_groups(store: BankStore, own_group: str, opts: BuildSettings, device: str, state, show: bool) -> int:
    encoded = 0
    for name, info in sorted(store.read_config().get("encoders", {}).items()):
        weights = None if info.get("weights") in (None, "random") else info["weights"]
        for size in info.get("encode_sizes", [info.get("encode_size")]):
            if size is None or f"{name}@{int(size)}" == own_group:
                continue
            missing = missing_parts(store, f"{name}@{int(size)}")[state.process_index :: state.num_processes]
            if missing:
                other = PromptEncoder(name, weights, device, int(size))
                encoded += encode_shards(store, other, missing, opts.batch_size, show)
    return encoded


def check_out_folder(out: Path) -> None:
    """--out must be a folder this user can write into (or one that can be made)."""
    import os

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a new or existing bank folder")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK) or not probe.stat().st_mode & 0o222:  # root ignores permissions
        raise UserError(
            f"--out {out}: {probe} is not writable by this user; choose another folder or fix its permissions"
        )


def generate_entries(
    store: BankStore,
    generator: Generator,
    encoder: PromptEncoder,
    entries: Sequence[Entry],
    opts: BuildSettings,
    rank: int = 0,
    progress: bool = True,
) -> dict[str, int]:
    """The core loop, one batch at a time; returns counts of ok / failed / retried images."""
    from tqdm.auto import tqdm

    stats = {"ok": 0, "failed": 0, "retried": 0}
    writer = BackgroundWriter(store, encoder.group, opts.shard_size, encoder.info)
    bar = tqdm(total=len(entries), desc=f"bank build ({generator.id})", unit="img", disable=not progress)
    try:
        for start in range(0, len(entries), opts.batch_size):
            batch = list(entries[start : start + opts.batch_size])
            t0 = time.time()
            # 6a. one request per entry, each with its own seed
            seeds = [e.seed for e in batch]
            requests = [Request(e.prompt, s, e.category, e.template) for e, s in zip(batch, seeds, strict=True)]
            out = _generate(generator, requests)
            images, alpha = out.images, out.alpha
            # 6b. check every image; the generator may also report failures of its own
            results = checks.check_images(images)
            forced = out.failures or [None] * len(batch)
            for i, reason in enumerate(forced):
                if reason:
                    results[i] = checks.CheckResult(False, reason, results[i].mean, results[i].std)
            notes = list(out.notes or [None] * len(batch))  # e.g. "fp32-decode": recorded per entry
            attempts = [1] * len(batch)
            # 6c. retry failed images with derived seeds (a generator-reported failure is final)
            for attempt in range(1, opts.retries + 1):
                redo = [i for i, r in enumerate(results) if not r.ok and not forced[i]]
                if not redo:
                    break
                stats["retried"] += len(redo)
                for i in redo:
                    seeds[i] = retry_seed(batch[i].seed, attempt)
                    attempts[i] += 1
                again = _generate(
                    generator, [Request(batch[i].prompt, seeds[i], batch[i].category, batch[i].template) for i in redo]
                )
                images, alpha = images.clone(), None if alpha is None else alpha.clone()
                for j, i in enumerate(redo):
                    images[i] = again.images[j].to(images.device)
                    if alpha is not None:
                        alpha[i] = again.alpha[j].to(alpha.device)
                for j, (i, result) in enumerate(zip(redo, checks.check_images(again.images), strict=False)):
                    reason = (again.failures or [None] * len(redo))[j]  # "nsfw" stays nsfw on a retry
                    results[i] = checks.CheckResult(False, reason, result.mean, result.std) if reason else result
                    notes[i] = (again.notes or [None] * len(redo))[j]
            # 6d. quantise to uint8 (what is stored is exactly what is encoded)
            good = [i for i, r in enumerate(results) if r.ok]
            pixels = checks.to_uint8(images)
            mattes = None if alpha is None else checks.to_uint8(alpha)[..., 0].cpu()
            # 6e. encode the valid images with the frozen prompt tower (on the device)
            feats = encoder(pixels[good]) if good else None
            pixels = pixels.cpu()
            row_of = {i: j for j, i in enumerate(good)}
            seconds = (time.time() - t0) / len(batch)
            # 6f. hand the entries to the writer thread (PNG + tar + feature part off this thread)
            items = []
            for i, entry in enumerate(batch):
                meta = _entry_meta(
                    entry,
                    generator,
                    seeds[i],
                    attempts[i],
                    results[i],
                    rank,
                    seconds,
                    pixels.shape[1:3],
                    alpha is not None,
                )
                if notes[i]:
                    meta["note"] = notes[i]
                if results[i].ok:
                    f = {k: v[row_of[i]] for k, v in feats.items()}
                    items.append((meta, pixels[i].numpy(), None if mattes is None else mattes[i].numpy(), f))
                else:
                    items.append((meta, None, None, None))
            writer.put(items)
            stats["ok"] += len(good)
            stats["failed"] += len(batch) - len(good)
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
    return stats


def _check_resolution(generator_id: str, resolution: int | None) -> None:
    import bank.generators  # noqa: F401  (registers the built-in generators)
    from bank.generators.base import GENERATORS

    if resolution is None or generator_id not in GENERATORS:
        return
    if "steps" in getattr(GENERATORS.get(generator_id), "defaults", {}) and resolution % 8:  # latent diffusion: 8x VAE
        raise UserError(
            f"--resolution {resolution}: generator {generator_id!r} makes images in multiples of 8 px; "
            f"use {max(8, resolution // 8 * 8)} or {resolution // 8 * 8 + 8}"
        )


def _generate(generator: Generator, requests: list[Request]):
    try:
        return generator.generate(requests)
    except (ValueError, TypeError) as err:  # the pipeline refused the settings (a size, a scheduler option)
        from dpseg.errors import first_line

        raise UserError(
            f"generator {generator.id!r} cannot make these images ({first_line(err)}); "
            f"check its flags (settings {generator.settings})"
        ) from None


def _entry_meta(
    entry: Entry,
    generator: Generator,
    used_seed: int,
    attempts: int,
    result: checks.CheckResult,
    rank: int,
    seconds: float,
    size,
    has_alpha: bool,
) -> dict[str, Any]:
    return {
        "key": entry.key,
        "category": entry.category,
        "template": entry.template_index,
        "prompt": entry.prompt,
        "seed": entry.seed,
        "used_seed": used_seed,
        "attempts": attempts,
        "status": "ok" if result.ok else "failed",
        "reason": result.reason,
        "check": {"mean": result.mean, "std": result.std},
        "generator": generator.id,
        "settings_hash": generator.settings_hash,
        "alpha": has_alpha and result.ok,
        "height": int(size[0]),
        "width": int(size[1]),
        "rank": rank,
        "generated_at": time.time(),
        "seconds": round(seconds, 4),
        "runtime": generator.runtime,
    }


def _with_device(options: GeneratorSettings, device: str) -> GeneratorSettings:
    from dataclasses import replace

    return replace(options, device=device)


def _durable_keys(store: BankStore) -> set[str]:
    """Keys of entries in the manifest or in shards not merged yet."""
    if not store.exists():
        return set()
    table, merged = read_manifest(store)
    keys = set(table.column("key").to_pylist())
    merged = set(merged)
    for shard in store.shards():
        if shard not in merged:
            keys.update(m["key"] for m in scan_shard(store.root / shard) if "key" in m)
    return keys


def _open_bank(
    store: BankStore, generator: Generator, encoder: PromptEncoder, opts: BuildSettings, categories: list[str]
) -> dict[str, Any]:
    """Creates bank.json or checks that this build matches it; adds new categories/templates."""
    with store.lock():
        leftovers = [
            p for p in store.root.iterdir() if p.name not in (".lock", "tmp") and not p.name.startswith(".build-")
        ]
        if not store.exists() and leftovers:
            raise UserError(
                f"{store.root} exists and is not a bank (no bank.json); choose an empty or new --out folder"
            )
        if store.exists() and not store.shards() and not (store.root / "staging").exists():
            # an earlier build failed before making any entry: its settings bind nothing, this build's replace them
            config = store.read_config()
            config.update(
                {
                    "generator": generator.describe(),
                    "seed": opts.seed,
                    "categories": [],
                    "templates": 0,
                    "vocabularies": [],
                    "encoders": {},
                }
            )
        elif store.exists():
            config = store.read_config()
            want = generator.describe()
            have = config["generator"]
            if (have["id"], have["settings_hash"]) != (want["id"], want["settings_hash"]) or config[
                "seed"
            ] != opts.seed:
                raise UserError(
                    f"{store.root} holds a bank of generator {have['id']!r} (settings {have['settings']}, "
                    f"seed {config['seed']}); "
                    f"this build asks for {want['id']!r} (settings {want['settings']}, seed {opts.seed}). "
                    f"Use a new --out folder, or the bank's own settings to extend it"
                )
            check_encoder_compatible(config, encoder.info)
        else:
            config = {
                "schema": SCHEMA_VERSION,
                "generator": generator.describe(),
                "seed": opts.seed,
                "categories": [],
                "templates": 0,
                "vocabularies": [],
                "encoders": {},
                "checks": checks.thresholds(),
                "image_format": "png",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        config["categories"] += [c for c in categories if c not in set(config["categories"])]
        config["templates"] = max(int(config["templates"]), opts.templates)
        config["vocabularies"] += [v for v in opts.vocab if v not in config["vocabularies"]]
        record_encoder(config, encoder.info)
        config["generator"]["runtime"] = generator.runtime
        config["environment"] = environment()  # threads and library versions of the latest build
        store.write_config(config)
        return config
