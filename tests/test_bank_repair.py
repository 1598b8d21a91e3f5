"""A damaged bank is repaired by running the same `dpseg bank build` again: each case damages a
copy of a built bank, repairs it with the same command, and compares it with the undamaged
build (equal entries, equal images, equal features); `verify` is ok after."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import bank_build_flags, write_vocab
from PIL import Image

from bank.inspection import verify
from bank.merge import read_manifest, write_manifest
from bank.reader import Bank
from bank.store import BankStore, ShardReader

CATS = ["red solid circle", "blue striped square", "green dotted triangle"]
BUILD = bank_build_flags("procedural", templates=3)


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("vocab"), CATS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, names, cli):
    out = tmp_path_factory.mktemp("ref") / "bank"
    result = cli("bank", "build", "--vocab", names, "--out", out, *BUILD)
    assert result.exit_code == 0, result.output
    assert verify(out) == []
    return out


def contents(root: Path) -> dict[str, tuple]:
    """key -> (category, template, status, pixels) from the manifest and the shards."""
    table, _ = read_manifest(BankStore(root))
    out = {}
    for r in table.to_pylist():
        pixels = None
        if r["status"] == "ok":
            with ShardReader(root / r["shard"]) as reader:
                pixels = np.asarray(Image.open(io.BytesIO(reader.read(r["key"], "png"))))
        out[r["key"]] = (r["category"], r["template"], r["status"], pixels)
    return out


def assert_equal_banks(a: Path, b: Path) -> None:
    ca, cb = contents(a), contents(b)
    assert sorted(ca) == sorted(cb) and len(ca) == 9
    for key, (cat, t, status, pixels) in ca.items():
        assert cb[key][:3] == (cat, t, status)
        np.testing.assert_array_equal(pixels, cb[key][3])
    pa, pb = Bank(a).prototypes(CATS, "tiny"), Bank(b).prototypes(CATS, "tiny")
    np.testing.assert_allclose(pa.embedding.numpy(), pb.embedding.numpy(), rtol=1e-2, atol=1e-2)
    for s in (4, 8, 16):
        np.testing.assert_allclose(pa.pooled[s].numpy(), pb.pooled[s].numpy(), rtol=1e-2, atol=1e-2)
    assert verify(b) == []


def _members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def truncate_at_member(copy: Path) -> None:
    shard = copy / "images-000001.tar"
    second = [m for m in _members(shard)][2]  # the second sample's first header
    shard.write_bytes(shard.read_bytes()[: second.offset])


def truncate_inside_member(copy: Path) -> None:
    shard = copy / "images-000002.tar"
    png = next(m for m in _members(shard) if m.name.endswith(".png"))
    shard.write_bytes(shard.read_bytes()[: png.offset_data + png.size // 2])


def unreadable_shard(copy: Path) -> None:
    (copy / "images-000000.tar").write_bytes(b"not a tar at all" * 64)


def shard_moved_out(copy: Path) -> None:
    shutil.move(copy / "images-000003.tar", copy.parent / "images-000003.tar")


def zarr_chunks(copy: Path, array: str) -> list[Path]:
    folder = copy / "features.zarr" / "tiny@128" / array
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json")


def deleted_feature_chunk(copy: Path) -> None:
    zarr_chunks(copy, "pooled_8")[0].unlink()


def garbled_valid_chunk(copy: Path) -> None:
    zarr_chunks(copy, "valid")[0].write_bytes(b"\x13garbage" * 5)


def missing_zarr_array(copy: Path) -> None:
    shutil.rmtree(copy / "features.zarr" / "tiny@128" / "embedding")


def garbage_manifest(copy: Path) -> None:
    (copy / "manifest.parquet").write_bytes(b"PAR1 this is not parquet" * 10)


def garbled_feature_part(copy: Path) -> None:
    part = sorted((copy / "staging" / "tiny@128").glob("*.safetensors"))[1]
    part.write_bytes(part.read_bytes()[:100])


def shard_missing_a_member(copy: Path) -> None:
    """The tar is whole (end marker and all) but one entry's PNG is gone."""
    shard = copy / "images-000004.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if not m.name.endswith(".png"):
                tar.addfile(m, io.BytesIO(data))


def killed_during_merge(copy: Path) -> None:
    """What a SIGKILL between the zarr write and the manifest write leaves: features of the last
    shard merged, its manifest rows not."""
    store = BankStore(copy)
    table, merged = read_manifest(store)
    last = merged[-1]
    keep = [s != last for s in table.column("shard").to_pylist()]
    import pyarrow as pa

    write_manifest(store, table.filter(pa.array(keep)), merged[:-1])


DAMAGES = [
    truncate_at_member,
    truncate_inside_member,
    unreadable_shard,
    shard_moved_out,
    deleted_feature_chunk,
    garbled_valid_chunk,
    missing_zarr_array,
    garbage_manifest,
    garbled_feature_part,
    shard_missing_a_member,
    killed_during_merge,
]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
def test_the_same_build_command_repairs_the_bank(reference, names, tmp_path, cli, damage):
    copy = tmp_path / "bank"
    shutil.copytree(reference, copy)
    damage(copy)
    assert verify(copy) != []  # the damage is seen ...
    result = cli("bank", "build", "--vocab", names, "--out", copy, *BUILD)
    assert result.exit_code == 0, result.output
    assert_equal_banks(reference, copy)  # ... and repaired


def test_verify_names_truncation_and_its_fix(reference, tmp_path, cli):
    copy = tmp_path / "bank"
    shutil.copytree(reference, copy)
    truncate_inside_member(copy)
    result = cli("bank", "verify", copy)
    assert result.exit_code == 1
    line = next(line for line in result.stdout.splitlines() if "images-000002.tar" in line)
    assert "truncated: the file ends inside member" in line and "dpseg bank build" in line


def test_verify_decodes_every_png_unless_quick(reference, tmp_path, cli, one_line_error):
    copy = tmp_path / "bank"
    shutil.copytree(reference, copy)
    flip_a_png_byte(copy / "images-000000.tar")
    result = cli("bank", "verify", copy)
    assert result.exit_code == 1 and "does not decode" in result.stdout
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert cli("bank", "verify", copy, "--quick").exit_code == 0  # the signature is intact


def flip_a_png_byte(shard: Path) -> str:
    """Flips one byte inside the first PNG's image data (CRC no longer matches); returns its key."""
    with tarfile.open(shard) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    at = png.offset_data + png.size // 2
    data[at] ^= 0xFF
    shard.write_bytes(bytes(data))
    return png.name.split(".")[0]


def test_verify_says_empty_for_a_bank_without_entries(tmp_path, names, cli, one_line_error, monkeypatch):
    from bank.build import BuildSettings, build_bank

    monkeypatch.setattr("bank.build.generate_entries", lambda *a, **k: {"ok": 0, "failed": 0, "retried": 0})
    build_bank(
        BuildSettings(
            out=tmp_path / "b",
            generator="procedural",
            vocab=[str(names)],
            encoder="tiny",
            encoder_weights=None,
            templates=3,
            progress=False,
        )
    )
    one_line_error(cli("bank", "verify", tmp_path / "b"), "is empty (0 of 9 entries)")


def test_a_build_that_failed_before_any_entry_does_not_bind_the_folder(tmp_path, names, cli):
    out = tmp_path / "b"
    from bank.build import BuildSettings, build_bank
    from bank.generators.base import Generated

    class Refusing:  # a generator that refuses its first request, as a pipeline refusing a size does
        id, settings, settings_hash, runtime = "procedural", {"resolution": 32}, "x", {}

        def describe(self):
            return {"id": self.id, "settings": self.settings, "settings_hash": self.settings_hash}

        def generate(self, requests) -> Generated:
            raise ValueError("height must be divisible by 8")

    from dpseg.errors import UserError

    with pytest.raises(UserError, match="cannot make these images"):
        build_bank(
            BuildSettings(
                out=out,
                generator="procedural",
                vocab=[str(names)],
                encoder="tiny",
                encoder_weights=None,
                templates=3,
                progress=False,
            ),
            generator=Refusing(),
        )
    assert (out / "bank.json").exists() and not list(out.glob("images-*.tar"))
    result = cli("bank", "build", "--vocab", names, "--out", out, *BUILD)  # the corrected command
    assert result.exit_code == 0, result.output
    assert verify(out) == [] and json.loads(cli("bank", "info", out, "--json").stdout)["entries"] == 9


def test_a_second_identical_build_is_refused_while_the_first_runs(reference, tmp_path, names, cli, one_line_error):
    import fcntl

    copy = tmp_path / "bank"
    shutil.copytree(reference, copy)
    lock = copy / ".build-0-of-1.rank-0-of-1.lock"
    with open(lock, "a+") as f:  # the first build holds its lock
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("pid 4242")
        f.flush()
        one_line_error(cli("bank", "build", "--vocab", names, "--out", copy, *BUILD), "pid 4242", "wait for it")
    assert cli("bank", "build", "--vocab", names, "--out", copy, *BUILD).exit_code == 0
    assert_equal_banks(reference, copy)


@pytest.mark.slow
def test_two_identical_builds_started_at_once_never_duplicate_entries(reference, tmp_path, names, cli):
    import subprocess
    import sys

    out = tmp_path / "bank"
    args = [sys.executable, "-m", "cli.main", "bank", "build", "--vocab", str(names), "--out", str(out), *BUILD]
    repo = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen(args, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    results = [(p.communicate(timeout=600)[1], p.returncode) for p in procs]
    results = [(code, err) for err, code in results]
    # each either built (or found everything built) or was refused with the lock's one line
    for code, err in results:
        assert code == 0 or (code == 1 and "another `dpseg bank build`" in err and "Traceback" not in err), err
    assert any(code == 0 for code, _ in results)
    keys = []
    for shard in sorted(out.glob("images-*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(keys) == len(set(keys)) == 9  # no entry made twice
    assert_equal_banks(reference, out)
