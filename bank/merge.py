"""Fold new shards and feature parts into manifest.parquet and features.zarr.

Runs under the bank lock, by one process at a time; idempotent, so a merge killed half-way is
simply run again. Order: scan new shards -> write features.zarr -> write manifest.parquet
(atomic); a reader sees either the previous manifest or the new one."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

from bank.store import FEATURE_NAMES, SCHEMA_VERSION, BankStore, crash_point, scan_shard, split_group
from dpseg.errors import UserError, first_line
from dpseg.io import atomic_write_bytes


class DamagedBank(UserError):
    """Part of a bank cannot be read; the message names it and the command that repairs it."""


MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("category", pa.string()),
        ("template", pa.int16()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("used_seed", pa.int64()),
        ("attempts", pa.int16()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("check_mean", pa.float32()),
        ("check_std", pa.float32()),
        ("generator", pa.string()),
        ("settings_hash", pa.string()),
        ("shard", pa.string()),
        ("alpha", pa.bool_()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("rank", pa.int32()),
        ("generated_at", pa.timestamp("ms", tz="UTC")),
        ("seconds", pa.float32()),
    ]
)
ZARR_CHUNK_TEMPLATES = 80  # a chunk holds all (up to 80) templates of ...
ZARR_CHUNK_CATEGORIES = 8  # ... 8 whole categories (zarr's per-chunk cost dominated reads of 1-category chunks)


def _row(meta: dict[str, Any], shard: str) -> dict[str, Any]:
    checks = meta.get("check") or {}
    return {
        "key": meta["key"],
        "category": meta["category"],
        "template": meta["template"],
        "prompt": meta["prompt"],
        "seed": meta["seed"],
        "used_seed": meta["used_seed"],
        "attempts": meta["attempts"],
        "status": meta["status"],
        "reason": meta.get("reason"),
        "check_mean": checks.get("mean"),
        "check_std": checks.get("std"),
        "generator": meta["generator"],
        "settings_hash": meta["settings_hash"],
        "shard": shard,
        "alpha": bool(meta.get("alpha")),
        "width": meta.get("width"),
        "height": meta.get("height"),
        "rank": meta.get("rank"),
        "generated_at": int(meta["generated_at"] * 1000),
        "seconds": meta.get("seconds"),
    }


def read_manifest(store: BankStore) -> tuple[pa.Table, list[str]]:
    """(table, shards merged into it). A manifest that cannot be read is a one-line error: it is
    derived data, rebuilt from the shards by the same `dpseg bank build` command."""
    if not store.manifest_path.is_file():
        return MANIFEST_SCHEMA.empty_table(), []
    try:
        table = pq.read_table(store.manifest_path)
        merged = json.loads((table.schema.metadata or {}).get(b"dpseg.merged_shards", b"[]"))
        missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
        if missing:
            raise ValueError(f"columns {sorted(missing)} missing")
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError alike for garbage
        raise DamagedBank(
            f"{store.manifest_path} is unreadable ({first_line(err, 120)}); run the same `dpseg bank "
            f"build` command again to rebuild it from the image shards"
        ) from None
    return table, merged


def write_manifest(store: BankStore, table: pa.Table, merged: list[str]) -> None:
    table = table.replace_schema_metadata(
        {"dpseg.merged_shards": json.dumps(merged), "dpseg.schema": str(SCHEMA_VERSION)}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(store.manifest_path, sink.getvalue().to_pybytes())


def group_info(config: dict, group: str) -> dict | None:
    """The encoder record of a features group (bank.json) with the group's own encode size."""
    name, size = split_group(group)
    info = config.get("encoders", {}).get(name)
    if info is None:
        return None
    return {**{k: v for k, v in info.items() if k != "encode_sizes"}, "encode_size": size, "prompt_size": size}


def open_features_group(store: BankStore, group_name: str, info: dict, config: dict, categories: int, templates: int):
    root = zarr.open_group(str(store.features_path), mode="a")
    root.attrs.update({"schema": SCHEMA_VERSION})
    group = root.require_group(group_name)
    dims = {"embedding": info["embed_dim"], **{f"pooled_{s}": c for s, c in info["channels"].items()}}
    compressors = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    arrays = {}
    for name in (*FEATURE_NAMES, "valid"):
        shape = (categories, templates) if name == "valid" else (categories, templates, dims[name])
        if name in group:
            arr = group[name]
            if arr.shape != shape:
                arr.resize(shape)  # categories and templates only grow
        else:
            chunks = (ZARR_CHUNK_CATEGORIES, ZARR_CHUNK_TEMPLATES) + (() if name == "valid" else (dims[name],))
            arr = group.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype="bool" if name == "valid" else "float16",
                fill_value=False if name == "valid" else np.nan,
                compressors=compressors,
            )
        arrays[name] = arr
    return group, arrays


def merge(store: BankStore) -> dict[str, Any]:
    with store.lock():
        store.clean_stale()
        config = store.read_config()
        # 1. new shards -> manifest rows (an entry counts once: the first shard that holds it)
        table, merged = read_manifest(store)
        seen = set(table.column("key").to_pylist())
        new_rows, duplicates, new_shards = [], 0, [s for s in store.shards() if s not in set(merged)]
        for shard in new_shards:
            for meta in scan_shard(store.root / shard):
                if meta.get("key") in seen or "category" not in meta:
                    duplicates += 1
                    continue
                seen.add(meta["key"])
                new_rows.append(_row(meta, shard))
        if new_rows:
            table = pa.concat_tables([table, pa.Table.from_pylist(new_rows, schema=MANIFEST_SCHEMA)])
        ok = {
            k: (c, t, sh)
            for k, c, t, s, sh in zip(
                table.column("key").to_pylist(),
                table.column("category").to_pylist(),
                table.column("template").to_pylist(),
                table.column("status").to_pylist(),
                table.column("shard").to_pylist(),
                strict=False,
            )
            if s == "ok"
        }
        # 2. new feature parts -> features.zarr/<encoder>@<size>; a damaged group is rebuilt from all parts
        categories = list(config["categories"])
        row_of = {c: i for i, c in enumerate(categories)}
        written, rebuilt = {}, []
        for group in store.staged_groups():
            info = group_info(config, group)
            if info is None:
                continue
            if _group_damaged(store, group, categories, int(config["templates"]), ok):
                _drop_group(store, group)
                rebuilt.append(group)
            written[group] = _merge_group(store, group, info, config, categories, row_of, ok)
        crash_point("merge")
        # 3. the manifest, atomically (the merge's commit point)
        write_manifest(store, table, merged + new_shards)
        return {
            "new_shards": len(new_shards),
            "new_entries": len(new_rows),
            "duplicates": duplicates,
            "features": written,
            "rebuilt_groups": rebuilt,
        }


def _drop_group(store: BankStore, group: str) -> None:
    import shutil

    shutil.rmtree(store.features_path / group, ignore_errors=True)


def _group_damaged(store: BankStore, group: str, categories: list[str], templates: int, ok: dict) -> bool:
    """True when features.zarr/<group> cannot be trusted: an array or chunk that is missing or
    does not decode, `valid` unlike the merged entries, or non-finite values where valid."""
    path = store.features_path / group
    if not path.exists():
        return False  # nothing to repair: it is (re)made from the parts
    try:
        g = zarr.open_group(str(path), mode="r")
        done = set(g.attrs.get("merged_parts", []))
        cats = list(g.attrs.get("categories", []))
        valid = g["valid"][:]
        row_of = {c: i for i, c in enumerate(cats)}
        want = np.zeros(valid.shape, bool)
        for category, template, shard in ok.values():
            if shard in done:
                if category not in row_of or template >= valid.shape[1]:
                    return True
                want[row_of[category], template] = True
        if not np.array_equal(valid, want):
            return True
        for name in FEATURE_NAMES:
            values = g[name][:]
            if values.shape[:2] != valid.shape or not np.isfinite(values[valid]).all():
                return True
    except Exception:  # missing array, undecodable chunk, garbled metadata
        return True
    return False


def _merge_group(store, group, info, config, categories, row_of, ok) -> int:
    parts = sorted(
        p.name.replace(".safetensors", ".tar") for p in (store.root / "staging" / group).glob("images-*.safetensors")
    )
    if not parts and not store.features_path.joinpath(group).exists():
        return 0
    try:
        handle, arrays = open_features_group(store, group, info, config, len(categories), int(config["templates"]))
    except Exception:  # the zarr root itself is garbled: it is derived data, made again from the parts
        import shutil

        shutil.rmtree(store.features_path, ignore_errors=True)
        handle, arrays = open_features_group(store, group, info, config, len(categories), int(config["templates"]))
    done = set(handle.attrs.get("merged_parts", []))
    todo = [p for p in parts if p not in done]
    rows, cols, values, merged_now = [], [], {n: [] for n in FEATURE_NAMES}, []
    for shard in todo:
        try:
            keys, feats = store.read_part(group, shard)
        except Exception:  # an unreadable part: left out; the next build or encode writes it again
            continue
        merged_now.append(shard)
        for i, key in enumerate(keys):
            if key not in ok:
                continue  # an image that is not (or not yet) a durable entry
            category, template, _ = ok[key]
            rows.append(row_of[category])
            cols.append(template)
            for n in FEATURE_NAMES:
                values[n].append(feats[n][i])
    if rows:
        touched = np.unique(rows)
        where = np.searchsorted(touched, rows)
        for name in (*FEATURE_NAMES, "valid"):
            block = arrays[name].oindex[touched]
            block[where, cols] = True if name == "valid" else np.stack(values[name])
            arrays[name].oindex[touched] = block
    handle.attrs.update(
        {
            "schema": SCHEMA_VERSION,
            "encoder": info,
            "encode_size": info["encode_size"],
            "generator": config["generator"],
            "templates": int(config["templates"]),
            "categories": categories,
            "merged_parts": sorted(done | set(merged_now)),
        }
    )
    return len(rows)
