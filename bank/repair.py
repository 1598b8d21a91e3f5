"""Repair: what `dpseg bank build` does first, so that running the same command again mends a
damaged bank. Entries are seeded per entry, so anything lost is simply made again; everything
but the image shards (manifest, features.zarr) is derived data, rebuilt from shards and parts.

    1 manifest that does not read       -> removed (merge rebuilds it from every shard)
    2 shard truncated or unreadable     -> moved to DIR/damaged/, its entries dropped (made anew)
    3 manifest rows of a missing shard  -> dropped (the shard was moved out: made anew)
    4 feature part that does not read   -> removed (the shard's stored images are encoded again)
    5 features.zarr group in doubt      -> checked and rebuilt from the parts by `merge`
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from bank.store import STAGING, BankStore

BLOCK = 512


def shard_damage(path: Path, expect: dict[str, str] | None = None) -> str | None:
    """What is wrong with one shard's tar structure (None: whole). Reads headers only: a tar cut
    inside a member, or right after one (no end-of-archive marker), is truncated. `expect`
    (key -> manifest status) also requires each entry's members (`.json`, and `.png` when ok)."""
    members: list[tarfile.TarInfo] = []
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tar:
            while (member := tar.next()) is not None:
                members.append(member)
    except tarfile.ReadError as err:
        if members and "unexpected end of data" in str(err):  # tarfile's word for a cut inside the last member's data
            return f"truncated: the file ends inside member {members[-1].name}"
        return f"unreadable ({type(err).__name__}: {err})"
    except (tarfile.TarError, OSError, EOFError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    end = 0
    for m in members:
        if m.offset_data + m.size > size:
            return f"truncated: the file ends inside member {m.name}"
        end = m.offset_data + -(-m.size // BLOCK) * BLOCK
    if size < end + 2 * BLOCK:
        last = f" after member {members[-1].name}" if members else ""
        return f"truncated{last} (no end-of-archive marker)"
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(2 * BLOCK) != bytes(2 * BLOCK):
            return "garbled after its last member (no end-of-archive marker)"
    names = {m.name for m in members}
    for key, status in (expect or {}).items():
        for ext in ("json", "png") if status == "ok" else ("json",):
            if f"{key}.{ext}" not in names:
                return f"entry {key} has no {ext} member"
    return None


def repair(store: BankStore) -> dict[str, Any]:
    """Run under the bank lock before a build plans its work; returns what was repaired."""
    from bank.merge import DamagedBank, read_manifest, write_manifest

    report: dict[str, Any] = {"manifest_rebuilt": False, "damaged_shards": [], "dropped_entries": 0, "removed_parts": 0}
    # 1. the manifest
    try:
        table, merged = read_manifest(store)
    except DamagedBank:
        store.manifest_path.unlink()
        table, merged = read_manifest(store)
        report["manifest_rebuilt"] = True
        _drop_features(store)  # its `valid` was derived from the manifest that is gone
    # 2. shards whose tar is damaged: out of the bank (kept for the user to inspect)
    shards = store.shards()
    expect: dict[str, dict[str, str]] = {}
    for key, shard, status in zip(*(table.column(c).to_pylist() for c in ("key", "shard", "status")), strict=True):
        expect.setdefault(shard, {})[key] = status
    damaged = [s for s in shards if shard_damage(store.root / s, expect.get(s))]
    if damaged:
        quarantine = store.root / "damaged"
        quarantine.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for shard in damaged:
            os.replace(store.root / shard, quarantine / f"{stamp}-{shard}")
        report["damaged_shards"] = damaged
    # 3. rows whose shard is gone (moved out, or just quarantined)
    present = set(store.shards())
    gone = [s for s in set(table.column("shard").to_pylist()) if s not in present]
    if gone or damaged:
        keep = [s in present for s in table.column("shard").to_pylist()]
        report["dropped_entries"] = len(keep) - sum(keep)
        import pyarrow as pa

        table = table.filter(pa.array(keep, pa.bool_()))
        write_manifest(store, table, [s for s in merged if s in present])
        for shard in set(gone) | set(damaged):  # their features: parts removed, groups rebuilt without them
            for part in (store.root / STAGING).glob(f"*/{shard.replace('.tar', '.safetensors')}"):
                part.unlink()
                report["removed_parts"] += 1
        _drop_features(store)
    # 4. feature parts that do not read are encoded again (build step 5 finds them missing)
    for group in store.staged_groups():
        for shard in sorted(present):
            path = store.part_path(group, shard)
            if path.is_file() and store.part_keys(group, shard) is None:
                path.unlink()
                report["removed_parts"] += 1
    return report


def _drop_features(store: BankStore) -> None:
    shutil.rmtree(store.features_path, ignore_errors=True)
