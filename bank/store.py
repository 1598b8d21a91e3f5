"""The bank on disk: layout, atomic writes, the lock, image shards and per-shard feature parts.

    DIR/bank.json                      resolved settings (generator, seed, categories, templates...)
    DIR/manifest.parquet               one row per durable entry (rebuilt by `merge`)
    DIR/images-%06d.tar                webdataset shards: <key>.png [+ <key>.alpha.png] + <key>.json
    DIR/staging/<group>/images-%06d.safetensors   that shard's features, one part per shard
    DIR/features.zarr/<group>/         merged features (C, M, D) and (C, M, C_l), float16

A features group is one (encoder, encode size) pair, named `<encoder>@<size>` (`convnext-b@768`):
the size prompt images were resized to before the tower is part of what the features mean, so
two sizes live side by side like two encoders.
    DIR/tmp/                           shards being written (locked while their writer lives)

A shard becomes part of the bank by one atomic step: its finished, fsynced temporary file is
hard-linked to the next free `images-%06d.tar` name. Everything else is derived from shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from shlex import quote
from typing import Any

import numpy as np

from dpseg import faults
from dpseg.errors import UserError
from dpseg.io import atomic_write_bytes, folder_lock, write_failed

SCHEMA_VERSION = 2  # 2: features groups are (encoder, encode size)
BANK_JSON = "bank.json"
MANIFEST = "manifest.parquet"
FEATURES = "features.zarr"
STAGING = "staging"
TMP = "tmp"
LOCK = ".lock"
SHARD_RE = re.compile(r"^images-(\d{6,})\.tar$")
FEATURE_NAMES = ("embedding", "pooled_4", "pooled_8", "pooled_16")


def feature_group(encoder: str, encode_size: int) -> str:
    return f"{encoder}@{int(encode_size)}"


def split_group(group: str) -> tuple[str, int]:
    """`convnext-b@768` -> ("convnext-b", 768)."""
    name, _, size = group.rpartition("@")
    if not name or not size.isdigit():
        raise ValueError(f"not a features group name: {group!r}")
    return name, int(size)


def shard_name(number: int) -> str:
    return f"images-{number:06d}.tar"


def shard_number(name: str) -> int:
    return int(SHARD_RE.match(name).group(1))


def crash_point(name: str) -> None:
    """Fault injection for the resume tests: DPSEG_BANK_CRASH=name:n (points: tar, part, merge)."""
    faults.crash_point("DPSEG_BANK_CRASH", name)


class BankStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---- layout -------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / BANK_JSON

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def features_path(self) -> Path:
        return self.root / FEATURES

    def part_path(self, group: str, shard: str) -> Path:
        return self.root / STAGING / group / shard.replace(".tar", ".safetensors")

    def exists(self) -> bool:
        return self.config_path.is_file()

    def require(self) -> BankStore:
        if not self.root.exists():
            raise UserError(
                f"no bank at {self.root}: the folder does not exist; "
                f"build one with `dpseg bank build --out {quote(str(self.root))} ...`"
            )
        if not self.exists():
            raise UserError(
                f"{self.root} is not a bank (no {BANK_JSON}); build one with "
                f"`dpseg bank build --out {quote(str(self.root))} ...`"
            )
        return self

    # ---- bank.json ----------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        try:
            config = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            self.require()
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{self.config_path} is corrupt ({err}); the bank cannot be used") from None
        if config.get("schema") == 1:
            g = config.get("generator", {})
            raise UserError(
                f"{self.root} is a bank of schema 1, whose features do not record the size prompt images were encoded "
                f"at; build it again into a new folder (same flags, same images): dpseg bank build --out NEW_FOLDER "
                f"--generator {g.get('id')} --seed {config.get('seed')} --templates {config.get('templates')} "
                f"--vocab {','.join(config.get('vocabularies', [])) or 'VOCAB'} "
                f"--encoder {next(iter(config.get('encoders', {})), 'ENCODER')} "
                f"(generator settings {g.get('settings')})"
            )
        if config.get("schema") != SCHEMA_VERSION:
            raise UserError(
                f"{self.root} has bank schema {config.get('schema')!r}; this dpseg reads schema {SCHEMA_VERSION}"
            )
        return config

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_bytes(self.config_path, json.dumps(config, indent=2, sort_keys=True).encode())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes (and nodes, where the filesystem supports flock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def build_lock(self, job: int, jobs: int, rank: int, ranks: int) -> contextlib.AbstractContextManager[None]:
        """Held for a whole build by each (job-array index, rank): a second identical build into
        the same folder is refused instead of generating the same entries twice."""
        return folder_lock(
            self.root,
            "dpseg bank build",
            doing="writing the same entries into",
            name=f".build-{job}-of-{jobs}.rank-{rank}-of-{ranks}.lock",
        )

    # ---- shards -------------------------------------------------------------------------
    def shards(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if SHARD_RE.match(p.name))

    def link_shard(self, tmp: Path) -> str:
        """Give a finished temporary tar the next free shard number, atomically."""
        taken = [int(SHARD_RE.match(s).group(1)) for s in self.shards()]
        number = max(taken) + 1 if taken else 0
        while True:
            try:
                os.link(tmp, self.root / shard_name(number))
                return shard_name(number)
            except FileExistsError:
                number += 1

    def clean_stale(self) -> list[str]:
        """Remove temporary files whose writer is gone (a killed run): their lock is free."""
        removed = []
        tmp_dir = self.root / TMP
        for path in sorted(tmp_dir.glob("*.tar")) if tmp_dir.is_dir() else []:
            with open(path, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer
                path.unlink(missing_ok=True)
                removed.append(path.name)
        for path in self.root.glob(f"{STAGING}/*/.*.tmp"):
            path.unlink(missing_ok=True)
        for path in self.root.glob(".*.tmp"):
            path.unlink(missing_ok=True)
        return removed

    def stale_files(self) -> list[str]:
        tmp_dir = self.root / TMP
        stale = []
        for path in sorted(tmp_dir.glob("*.tar")) if tmp_dir.is_dir() else []:
            with open(path, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    stale.append(str(path.relative_to(self.root)))
                except BlockingIOError:
                    pass
        return stale

    # ---- feature parts ------------------------------------------------------------------
    def write_part(
        self, group: str, shard: str, keys: list[str], features: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> Path:
        from safetensors.numpy import save

        path = self.part_path(group, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: np.ascontiguousarray(features[name], dtype=np.float16) for name in FEATURE_NAMES}
        metadata = {"keys": json.dumps(keys), "shard": shard, "group": group, "meta": json.dumps(meta)}
        atomic_write_bytes(path, save(tensors, metadata=metadata))
        return path

    def part_keys(self, group: str, shard: str) -> list[str] | None:
        """The keys a shard's feature part holds; None when the part is missing or unreadable (both
        are repaired the same way: the shard's stored images are encoded again)."""
        from safetensors import safe_open

        path = self.part_path(group, shard)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "np") as f:  # checks the header against the file's length
                return json.loads(f.metadata()["keys"])
        except Exception:  # garbled or truncated: safetensors raises its own error types
            return None

    def read_part(self, group: str, shard: str) -> tuple[list[str], dict[str, np.ndarray]]:
        from safetensors import safe_open

        with safe_open(str(self.part_path(group, shard)), "np") as f:
            keys = json.loads(f.metadata()["keys"])
            feats = {name: f.get_tensor(name) for name in FEATURE_NAMES}
        if any(len(v) != len(keys) for v in feats.values()) and keys:
            raise ValueError(f"feature part of {shard} holds {len(keys)} keys but arrays of other lengths")
        return keys, feats

    def staged_groups(self) -> list[str]:
        staging = self.root / STAGING
        return sorted(p.name for p in staging.iterdir() if p.is_dir() and "@" in p.name) if staging.is_dir() else []


class ShardWriter:
    """One writer's open shard. Samples are appended to tmp/<uuid>.tar (flock-held while open);
    `commit()` closes, fsyncs and links it, then writes its feature part."""

    def __init__(self, store: BankStore, group: str, max_samples: int, meta: dict[str, Any]):
        self.store, self.group, self.max_samples, self.meta = store, group, max_samples, meta
        self.file = None
        self.committed: list[str] = []

    def _open(self) -> None:
        import webdataset as wds

        tmp_dir = self.store.root / TMP
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.path = tmp_dir / f"{uuid.uuid4().hex}.tar"
        self.file = open(self.path, "wb")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        self.tar = wds.TarWriter(self.file)
        self.bytes = 0
        self.keys: list[str] = []  # entries with an image (and so features)
        self.features: dict[str, list[np.ndarray]] = {n: [] for n in FEATURE_NAMES}
        self.count = 0

    def add(self, key: str, files: dict[str, bytes], features: dict[str, np.ndarray] | None) -> str | None:
        """Adds one sample; returns the shard name when this filled and committed a shard."""
        if self.file is None:
            self._open()
        try:
            self.tar.write({"__key__": key, **files})
        except OSError as err:  # a full disk: name the file (the shard is dropped by abort(), never kept half-written)
            raise write_failed(err, self.path, self.needed()) from None
        self.bytes += sum(len(v) for v in files.values())
        if features is not None:
            self.keys.append(key)
            for name in FEATURE_NAMES:
                self.features[name].append(features[name])
        self.count += 1
        crash_point("tar")
        return self.commit() if self.count >= self.max_samples else None

    def needed(self) -> int:
        """About the size the shard being written needs: its samples and a tar's own blocks."""
        return self.bytes + 1024 * (self.count + 1) + tarfile.RECORDSIZE

    def commit(self) -> str | None:
        if self.file is None:
            return None
        try:
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as err:
            failed = write_failed(err, self.path, self.needed())
            self.abort()
            raise failed from None
        shard = self.store.link_shard(self.path)
        self.path.unlink()
        self.file.close()  # releases the lock
        self.file = None
        crash_point("part")
        stacked = {n: np.stack(v) if v else np.zeros((0, 0), np.float16) for n, v in self.features.items()}
        self.store.write_part(self.group, shard, self.keys, stacked, self.meta)
        self.committed.append(shard)
        return shard

    def abort(self) -> None:
        if self.file is not None:
            self.tar.tarstream.closed = True  # nothing more is written into a dropped shard, not even at exit
            with contextlib.suppress(OSError):  # the buffer that failed to reach the disk fails again: drop it
                self.file.close()
            self.path.unlink(missing_ok=True)
            self.file = None


class ShardReader:
    """Random access to the samples of one shard (stdlib tarfile, offsets from its headers)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:")
            members = self.tar.getmembers()
        except (tarfile.TarError, OSError) as err:
            raise UserError(
                f"shard {path} is unreadable ({err}); run the same `dpseg bank build` command again (it moves "
                f"the shard to damaged/ and makes its entries anew), or restore the shard"
            ) from None
        self.members: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            self.members.setdefault(key, {})[ext] = m

    def read(self, key: str, ext: str) -> bytes:
        member = self.members.get(key, {}).get(ext)
        if member is None:
            raise UserError(
                f"shard {self.path} has no {ext!r} member for entry {key}; run `dpseg bank verify` on the bank, "
                f"then the same `dpseg bank build` command to make the entry anew"
            )
        try:
            data = self.tar.extractfile(member).read()
        except (tarfile.TarError, OSError):
            data = b""
        if len(data) != member.size:
            raise UserError(
                f"shard {self.path} is truncated inside entry {key}; run the same `dpseg bank build` command "
                f"again to make its entries anew"
            )
        return data

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads(self.read(key, "json"))

    def close(self) -> None:
        self.tar.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scan_shard(path: Path) -> list[dict[str, Any]]:
    """The metadata of every sample in a shard (reads headers and the small json members)."""
    with ShardReader(path) as reader:
        rows = []
        for key, files in reader.members.items():
            meta = reader.meta(key) if "json" in files else {"key": key, "status": "unknown"}
            meta["files"] = sorted(files)
            rows.append(meta)
        return rows


def decode_png(data: bytes, where: str = "image") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L") else im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # PIL: SyntaxError for broken PNGs
        raise UserError(
            f"{where} is not a readable PNG ({err}); move that shard out of the bank folder and run the same "
            f"`dpseg bank build` command again (its entries are made anew)"
        ) from None


def encode_png(array: np.ndarray) -> bytes:
    """Lossless; compression level 1 (fast: the bank writes ~100k images)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="png", compress_level=1)
    return buf.getvalue()
