"""`bank info` and `bank verify`: what a bank holds, and whether manifest, shards and features
agree."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bank.merge import read_manifest
from bank.plan import plan_entries
from bank.store import FEATURE_NAMES, BankStore, ShardReader


def info(root: str | Path) -> dict[str, Any]:
    store = BankStore(root).require()
    config = store.read_config()
    table, merged = read_manifest(store)
    status = table.column("status").to_pylist()
    ok_categories = {c for c, s in zip(table.column("category").to_pylist(), status) if s == "ok"}
    from bank.reader import Bank

    encoders = Bank(root).encoders()
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
        "shards": len(store.shards()),
        "unmerged_shards": len(unmerged),
        "vocabularies": config.get("vocabularies", []),
        "derived_from": config.get("derived_from"),
    }


def verify(root: str | Path) -> list[str]:
    """Every problem found, as one line each (empty: the bank is consistent)."""
    store = BankStore(root).require()
    config = store.read_config()
    problems: list[str] = []
    try:
        table, merged = read_manifest(store)
    except Exception as err:  # unreadable parquet
        return [f"manifest.parquet is unreadable: {err}"]
    rows = table.to_pylist()
    keys = [r["key"] for r in rows]
    for key, n in Counter(keys).items():
        if n > 1:
            problems.append(f"manifest: entry {key} appears {n} times")
    gen = config["generator"]
    expected = {e.key: e for e in plan_entries(config["categories"], int(config["templates"]), gen["id"],
                                               gen["settings_hash"], config["seed"])}
    for r in rows:
        e = expected.get(r["key"])
        if e is None:
            problems.append(f"manifest: entry {r['key']} ({r['category']!r} #{r['template']}) is not an entry of this bank's settings")
        elif (e.category, e.template_index, e.prompt, e.seed) != (r["category"], r["template"], r["prompt"], r["seed"]):
            problems.append(f"manifest: entry {r['key']} does not match its planned category/template/prompt/seed")
        if r["status"] not in ("ok", "failed"):
            problems.append(f"manifest: entry {r['key']} has status {r['status']!r}")
    # shards: readable, every manifest entry where it says, nothing unaccounted for
    by_shard: dict[str, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    shards = store.shards()
    for shard in sorted(set(by_shard) - set(shards)):
        problems.append(f"manifest: {len(by_shard[shard])} entries point to missing shard {shard}")
    for shard in shards:
        if shard not in set(merged):
            problems.append(f"{shard}: not merged into the manifest; run the build (or bank encode) again to merge it")
            continue
        try:
            with ShardReader(store.root / shard) as reader:
                members = reader.members
                for key, files in members.items():
                    if key not in expected:
                        problems.append(f"{shard}: sample {key} is not an entry of this bank")
                for r in by_shard.get(shard, []):
                    files = members.get(r["key"], {})
                    if "json" not in files:
                        problems.append(f"{shard}: entry {r['key']} is missing")
                    elif r["status"] == "ok" and "png" not in files:
                        problems.append(f"{shard}: entry {r['key']} has no image")
                    elif r["status"] == "failed" and "png" in files:
                        problems.append(f"{shard}: failed entry {r['key']} holds an image")
                    elif r["status"] == "ok":
                        data = reader.read(r["key"], "png")
                        if not data.startswith(b"\x89PNG"):
                            problems.append(f"{shard}: entry {r['key']} image is not a PNG")
                mine = {r["key"] for r in by_shard.get(shard, [])}
                extra = [k for k in members if k not in mine and k in expected]
                if extra:
                    problems.append(f"{shard}: {len(extra)} samples are duplicates of entries stored elsewhere")
        except Exception as err:  # truncated or corrupt tar
            problems.append(f"{shard}: unreadable ({type(err).__name__}: {err})")
    # features: one group per encoder, valid exactly where the manifest has an ok entry
    ok_cells = {(r["category"], r["template"]) for r in rows if r["status"] == "ok"}
    problems += _verify_features(store, config, ok_cells, by_shard)
    for stale in store.stale_files():
        problems.append(f"{stale}: temporary file of a killed run (removed by the next build)")
    return problems


def _verify_features(store: BankStore, config: dict, ok_cells: set, by_shard: dict) -> list[str]:
    import zarr

    problems = []
    encoders = list(config.get("encoders", {}))
    if not store.features_path.is_dir():
        return [f"features.zarr is missing (encoders {', '.join(encoders)})"] if ok_cells else []
    root = zarr.open_group(str(store.features_path), mode="r")
    groups = dict(root.groups())
    for encoder in encoders:
        if encoder not in groups:
            problems.append(f"features.zarr: no group for encoder {encoder!r}; run: dpseg bank encode {store.root} --encoder {encoder}")
            continue
        g = groups[encoder]
        for attr in ("encoder", "generator", "templates", "categories", "schema"):
            if attr not in g.attrs:
                problems.append(f"features.zarr/{encoder}: attribute {attr!r} missing")
        categories = list(g.attrs.get("categories", []))
        m = int(g.attrs.get("templates", 0))
        valid = g["valid"][:]
        want = np.zeros((len(categories), m), bool)
        row_of = {c: i for i, c in enumerate(categories)}
        for c, t in ok_cells:
            if c not in row_of or t >= m:
                problems.append(f"features.zarr/{encoder}: no row for entry ({c!r}, template {t})")
            else:
                want[row_of[c], t] = True
        lost = np.argwhere(want & ~valid)
        extra = np.argwhere(valid & ~want)
        for i, t in lost[:20]:
            problems.append(f"features.zarr/{encoder}: entry ({categories[i]!r}, template {t}) has no features")
        for i, t in extra[:20]:
            problems.append(f"features.zarr/{encoder}: features for ({categories[i]!r}, template {t}) have no manifest entry")
        for name in FEATURE_NAMES:
            arr = g[name]
            if arr.shape[:2] != valid.shape:
                problems.append(f"features.zarr/{encoder}/{name}: shape {arr.shape} does not match valid {valid.shape}")
                continue
            values = arr[:]
            if not np.isfinite(values[valid]).all():
                problems.append(f"features.zarr/{encoder}/{name}: non-finite values in valid entries")
        for shard in by_shard:
            if not store.part_path(encoder, shard).is_file() and any(r["status"] == "ok" for r in by_shard[shard]):
                problems.append(f"staging/{encoder}: no feature part for {shard}; run: dpseg bank encode {store.root} --encoder {encoder}")
    return problems


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
