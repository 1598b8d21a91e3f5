"""`bank info` and `bank verify`: what a bank holds, and whether manifest, shards and features
agree."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from shlex import quote
from typing import Any

import numpy as np

from bank.merge import DamagedBank, read_manifest
from bank.plan import plan_entries
from bank.repair import shard_damage
from bank.store import FEATURE_NAMES, BankStore, ShardReader, feature_group, split_group
from dpseg.errors import first_line


def info(root: str | Path) -> dict[str, Any]:
    store = BankStore(root).require()
    config = store.read_config()
    table, merged = read_manifest(store)
    status = table.column("status").to_pylist()
    ok_categories = {c for c, s in zip(table.column("category").to_pylist(), status, strict=False) if s == "ok"}
    from bank.reader import Bank

    groups = Bank(root).groups()
    encoders = sorted({name for name, _ in groups.values()})
    planned = len(config["categories"]) * int(config["templates"])
    unmerged = [s for s in store.shards() if s not in set(merged)]
    return {
        "bank": str(store.root),
        "entries": status.count("ok"),
        "failed": status.count("failed"),
        "categories": len(ok_categories),
        "templates": int(config["templates"]),
        "planned": planned,
        "missing": max(planned - len(status), 0),
        "generator": config["generator"]["id"],
        "generator_settings": config["generator"]["settings"],
        "settings_hash": config["generator"]["settings_hash"],
        "seed": config["seed"],
        "encoders": encoders,
        "encode_sizes": {e: sorted(size for name, size in groups.values() if name == e) for e in encoders},
        "features": {
            g: {
                "encoder": name,
                "encode_size": size,
                "weights": config.get("encoders", {}).get(name, {}).get("weights"),
            }
            for g, (name, size) in groups.items()
        },
        "shards": len(store.shards()),
        "unmerged_shards": len(unmerged),
        "vocabularies": config.get("vocabularies", []),
        "derived_from": config.get("derived_from"),
    }


def verify(root: str | Path, quick: bool = False) -> list[str]:
    """Every problem found, as one line each (empty: the bank is consistent). Every stored PNG
    is decoded; `quick` checks only PNG signatures and the tar structure."""
    store = BankStore(root).require()
    config = store.read_config()
    problems: list[str] = []
    try:
        table, merged = read_manifest(store)
    except DamagedBank as err:
        return [str(err)]
    rows = table.to_pylist()
    keys = [r["key"] for r in rows]
    for key, n in Counter(keys).items():
        if n > 1:
            problems.append(f"manifest: entry {key} appears {n} times")
    gen = config["generator"]
    expected = {
        e.key: e
        for e in plan_entries(
            config["categories"], int(config["templates"]), gen["id"], gen["settings_hash"], config["seed"]
        )
    }
    for r in rows:
        e = expected.get(r["key"])
        if e is None:
            problems.append(
                f"manifest: entry {r['key']} ({r['category']!r} #{r['template']}) "
                f"is not an entry of this bank's settings"
            )
        elif (e.category, e.template_index, e.prompt, e.seed) != (r["category"], r["template"], r["prompt"], r["seed"]):
            problems.append(f"manifest: entry {r['key']} does not match its planned category/template/prompt/seed")
        if r["status"] not in ("ok", "failed"):
            problems.append(f"manifest: entry {r['key']} has status {r['status']!r}")
    # shards: whole, every manifest entry where it says and decodable, nothing unaccounted for
    by_shard: dict[str, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    shards = store.shards()
    fix = "run the same `dpseg bank build` command again to make its entries anew"
    for shard in sorted(set(by_shard) - set(shards)):
        problems.append(f"manifest: {len(by_shard[shard])} entries point to missing shard {shard}; {fix}")
    for shard in shards:
        damage = shard_damage(store.root / shard)
        if damage:
            problems.append(f"{shard}: {damage}; {fix}")
            continue
        if shard not in set(merged):
            problems.append(f"{shard}: not merged into the manifest; run the build (or bank encode) again to merge it")
            continue
        problems += _verify_shard(store, shard, by_shard.get(shard, []), expected, quick)
    # features: one group per (encoder, encode size), valid exactly where the manifest has an ok entry
    ok_cells = {(r["category"], r["template"]) for r in rows if r["status"] == "ok"}
    problems += _verify_features(store, config, ok_cells, by_shard)
    for stale in store.stale_files():
        problems.append(f"{stale}: temporary file of a killed run (removed by the next build)")
    return problems


def _verify_shard(store: BankStore, shard: str, rows: list[dict], expected: dict, quick: bool) -> list[str]:
    problems = []
    with ShardReader(store.root / shard) as reader:
        members = reader.members
        for key in members:
            if key not in expected:
                problems.append(f"{shard}: sample {key} is not an entry of this bank")
        for r in rows:
            files = members.get(r["key"], {})
            if "json" not in files:
                problems.append(f"{shard}: entry {r['key']} is missing")
            elif r["status"] == "ok" and "png" not in files:
                problems.append(f"{shard}: entry {r['key']} has no image")
            elif r["status"] == "failed" and "png" in files:
                problems.append(f"{shard}: failed entry {r['key']} holds an image")
            elif r["status"] == "ok":
                bad = _png_problem(reader.read(r["key"], "png"), quick)
                if bad:
                    problems.append(f"{shard}: entry {r['key']} image {bad}")
        mine = {r["key"] for r in rows}
        extra = [k for k in members if k not in mine and k in expected]
        if extra:
            problems.append(f"{shard}: {len(extra)} samples are duplicates of entries stored elsewhere")
    return problems


def _png_problem(data: bytes, quick: bool) -> str | None:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "is not a PNG"
    if quick:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes every row and checks the chunk CRCs
    except Exception as err:  # PIL raises OSError/SyntaxError/ValueError for broken files
        return f"does not decode ({type(err).__name__}: {first_line(err, 80)})"
    return None


def _verify_features(store: BankStore, config: dict, ok_cells: set, by_shard: dict) -> list[str]:
    import zarr

    problems = []
    groups = [
        feature_group(name, size)
        for name, info in config.get("encoders", {}).items()
        for size in info.get("encode_sizes", [])
    ]
    if not store.features_path.is_dir():
        return (
            [f"features.zarr is missing (groups {', '.join(groups)}); run the same `dpseg bank build` command again"]
            if ok_cells
            else []
        )
    for group in groups:
        name, size = split_group(group)
        fix = f"repair with: dpseg bank encode {quote(str(store.root))} --encoder {name} --encode-size {size}"
        try:
            g = zarr.open_group(str(store.features_path / group), mode="r")
            problems += _verify_group(g, group, ok_cells, fix)
        except Exception as err:  # a missing array or group, an undecodable chunk
            problems.append(f"features.zarr/{group}: unreadable ({type(err).__name__}: {first_line(err, 80)}); {fix}")
            continue
        for shard in by_shard:
            if not any(r["status"] == "ok" for r in by_shard[shard]) or store.part_keys(group, shard) is not None:
                continue
            state = "unreadable feature part" if store.part_path(group, shard).is_file() else "no feature part"
            problems.append(f"staging/{group}: {state} for {shard}; {fix}")
    return problems


def _verify_group(g, group: str, ok_cells: set, fix: str) -> list[str]:
    problems = []
    for attr in ("encoder", "encode_size", "generator", "templates", "categories", "schema"):
        if attr not in g.attrs:
            problems.append(f"features.zarr/{group}: attribute {attr!r} missing; {fix}")
    categories = list(g.attrs.get("categories", []))
    m = int(g.attrs.get("templates", 0))
    valid = g["valid"][:]
    want = np.zeros((len(categories), m), bool)
    row_of = {c: i for i, c in enumerate(categories)}
    for c, t in ok_cells:
        if c not in row_of or t >= m:
            problems.append(f"features.zarr/{group}: no row for entry ({c!r}, template {t}); {fix}")
        else:
            want[row_of[c], t] = True
    if valid.shape != want.shape:
        return problems + [f"features.zarr/{group}/valid: shape {valid.shape}, expected {want.shape}; {fix}"]
    for i, t in np.argwhere(want & ~valid)[:20]:
        problems.append(f"features.zarr/{group}: entry ({categories[i]!r}, template {t}) has no features; {fix}")
    for i, t in np.argwhere(valid & ~want)[:20]:
        problems.append(
            f"features.zarr/{group}: features for ({categories[i]!r}, template {t}) have no manifest entry; "
            f"run the same `dpseg bank build` command again to merge"
        )
    for name in FEATURE_NAMES:
        arr = g[name]
        if arr.shape[:2] != valid.shape:
            problems.append(
                f"features.zarr/{group}/{name}: shape {arr.shape} does not match valid {valid.shape}; {fix}"
            )
            continue
        if not np.isfinite(arr[:][valid]).all():
            problems.append(f"features.zarr/{group}/{name}: entries marked valid hold no values (a lost chunk); {fix}")
    return problems


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
