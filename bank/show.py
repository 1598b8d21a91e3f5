"""`bank show`: a contact sheet of one category's images (template index under each)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from bank.merge import read_manifest
from bank.store import BankStore, ShardReader, decode_png
from dpseg.clip.templates import primary_name
from dpseg.errors import UserError
from dpseg.io import atomic_write_bytes


def contact_sheet(root: str | Path, category: str, out: str | Path, tile: int = 128, columns: int = 10) -> dict:
    from PIL import Image, ImageDraw

    store = BankStore(root).require()
    table, _ = read_manifest(store)
    name = primary_name(category)
    rows = sorted((r for r in table.to_pylist() if r["category"] == name), key=lambda r: r["template"])
    if not rows:
        known = sorted(set(table.column("category").to_pylist()))
        hint = ", ".join(repr(c) for c in known[:10]) + (" ..." if len(known) > 10 else "")
        raise UserError(f"bank {store.root} has no entries for category {category!r}; it has: {hint or 'none'}")
    cols = min(columns, len(rows))
    label = 14
    sheet = Image.new("RGB", (cols * tile, math.ceil(len(rows) / cols) * (tile + label)), "white")
    draw = ImageDraw.Draw(sheet)
    readers: dict[str, ShardReader] = {}
    try:
        for i, r in enumerate(rows):
            x, y = (i % cols) * tile, (i // cols) * (tile + label)
            if r["status"] == "ok":
                reader = readers.setdefault(r["shard"], ShardReader(store.root / r["shard"]))
                pixels = decode_png(reader.read(r["key"], "png"), f"{reader.path}: entry {r['key']}")
                sheet.paste(Image.fromarray(pixels).convert("RGB").resize((tile, tile)), (x, y))
            else:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline="red")
                draw.text((x + 4, y + tile // 2), f"failed: {r['reason']}", fill="red")
            draw.text((x + 2, y + tile), f"#{r['template']}", fill="black")
    finally:
        for reader in readers.values():
            reader.close()
    out = Path(out)
    if out.is_dir():
        raise UserError(f"-o {out} is a folder; give the contact sheet's file name, e.g. -o {out / (name + '.png')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, format="png")
    atomic_write_bytes(out, buf.getvalue())
    return {
        "category": name,
        "images": sum(r["status"] == "ok" for r in rows),
        "failed": sum(r["status"] != "ok" for r in rows),
        "out": str(out),
    }


def category_images(root: str | Path, categories: list[str], limit: int = 4, table=None) -> dict[str, list]:
    """Up to `limit` of each category's stored prompt images (lowest templates first) as RGB
    uint8 arrays; categories the bank lacks get an empty list. `table` (the manifest, from
    `read_manifest`) saves re-reading it for each call. Each shard is read from its start only
    as far as the last wanted entry (a shard holds hundreds; reading all their headers is what
    makes `ShardReader` slow for a few images)."""
    import tarfile

    import numpy as np
    from PIL import Image

    store = BankStore(root).require()
    if table is None:
        table, _ = read_manifest(store)
    wanted = {primary_name(c): c for c in categories}
    rows: dict[str, list[dict]] = {name: [] for name in wanted}
    for r in table.select(["key", "category", "template", "status", "shard"]).to_pylist():
        if r["category"] in rows and r["status"] == "ok":
            rows[r["category"]].append(r)
    chosen = {name: sorted(rs, key=lambda r: r["template"])[:limit] for name, rs in rows.items()}
    by_shard: dict[str, set[str]] = {}
    for rs in chosen.values():
        for r in rs:
            by_shard.setdefault(r["shard"], set()).add(r["key"])
    pngs: dict[str, bytes] = {}
    for shard, keys in by_shard.items():
        path = store.root / shard
        todo = set(keys)
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if ext == "png" and key in todo:
                        pngs[key] = tar.extractfile(member).read()
                        todo.discard(key)
                        if not todo:
                            break
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"shard {path} is unreadable ({err}); run `dpseg bank verify {store.root}`") from None
        if todo:
            raise UserError(f"shard {path} lacks {len(todo)} entries its manifest lists; run `dpseg bank verify`")
    out: dict[str, list] = {}
    for name, category in wanted.items():
        out[category] = [
            np.asarray(
                Image.fromarray(decode_png(pngs[r["key"]], f"{store.root / r['shard']}: {r['key']}")).convert("RGB")
            )
            for r in chosen[name]
        ]
    return out
