"""No tracebacks: every careless or unlucky use of the bank commands prints one `Error:` line
naming the thing and the fix, exit code 1; files honour the umask."""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import bank_build_flags, write_vocab

from bank.inspection import verify
from bank.merge import read_manifest, write_manifest
from bank.reader import Bank
from bank.store import BankStore
from dpseg.errors import UserError

CATS = ["red solid circle", "blue striped square"]
BUILD = bank_build_flags("procedural", templates=2)


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("vocab"), CATS)


@pytest.fixture(scope="module")
def built(tmp_path_factory, names, cli):
    out = tmp_path_factory.mktemp("built") / "bank"
    result = cli("bank", "build", "--vocab", names, "--out", out, *BUILD)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(built, tmp_path):
    shutil.copytree(built, tmp_path / "bank")
    return tmp_path / "bank"


def test_out_that_is_a_regular_file(tmp_path, names, cli, one_line_error):
    (tmp_path / "f").write_text("x")
    one_line_error(
        cli("bank", "build", "--vocab", names, "--out", tmp_path / "f", *BUILD), str(tmp_path / "f"), "is a file"
    )


def test_read_only_out(tmp_path, names, cli, one_line_error):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        one_line_error(
            cli("bank", "build", "--vocab", names, "--out", tmp_path / "ro" / "bank", *BUILD), "not writable"
        )
        one_line_error(cli("bank", "build", "--vocab", names, "--out", tmp_path / "ro", *BUILD), "not writable")
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert list((tmp_path / "ro").iterdir()) == []


def test_garbage_manifest_info(copy, cli, one_line_error):
    (copy / "manifest.parquet").write_bytes(b"garbage" * 50)
    one_line_error(cli("bank", "info", copy), "manifest.parquet is unreadable", "dpseg bank build")
    result = cli("bank", "verify", copy)
    assert result.exit_code == 1 and "manifest.parquet is unreadable" in result.stdout


def _chunk(copy: Path, array: str) -> Path:
    return next(
        p
        for p in sorted((copy / "features.zarr" / "tiny@128" / array).rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    )


def test_garbled_zarr_chunk_verify_and_reader(copy, cli):
    _chunk(copy, "embedding").write_bytes(b"\x01garbled" * 9)
    result = cli("bank", "verify", copy)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "features.zarr/tiny@128: unreadable" in result.stdout and "dpseg bank encode" in result.stdout
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    with pytest.raises(UserError, match="features.zarr/tiny@128/embedding is damaged.*dpseg bank encode"):
        Bank(copy).prototypes(CATS, "tiny")


def test_missing_zarr_array_verify_and_reader(copy, cli):
    shutil.rmtree(copy / "features.zarr" / "tiny@128" / "pooled_4")
    result = cli("bank", "verify", copy)
    assert result.exit_code == 1 and "tiny@128" in result.stdout and "Traceback" not in result.output
    with pytest.raises(UserError, match="pooled_4 is damaged"):
        Bank(copy).prototypes(CATS, "tiny")


def test_state_after_a_kill_during_merge(copy, cli, one_line_error):
    """Features of the last shard merged, its manifest rows not (SIGKILL at crash point 'merge')."""
    import pyarrow as pa

    store = BankStore(copy)
    table, merged = read_manifest(store)
    keep = [s != merged[-1] for s in table.column("shard").to_pylist()]
    write_manifest(store, table.filter(pa.array(keep)), merged[:-1])
    result = cli("bank", "verify", copy)
    assert result.exit_code == 1 and "not merged into the manifest" in result.stdout
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    protos = Bank(copy).prototypes(CATS, "tiny")  # the features on disk are whole: the reader serves them
    assert np.isfinite(protos.embedding.numpy()).all()


def _flip_png(shard: Path) -> str:
    with tarfile.open(shard) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    data[png.offset_data + png.size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return png.name.split(".")[0]


def test_flipped_png_show_and_derive(copy, tmp_path, cli, one_line_error):
    key = _flip_png(copy / "images-000000.tar")
    category = next(r["category"] for r in read_manifest(BankStore(copy))[0].to_pylist() if r["key"] == key)
    one_line_error(
        cli("bank", "show", copy, "--category", category, "-o", tmp_path / "s.png"), key, "not a readable PNG"
    )
    one_line_error(
        cli("bank", "derive", "--from", copy, "--noise", "0.2", "--out", tmp_path / "n", "--no-progress"),
        key,
        "not a readable PNG",
    )
    assert not (tmp_path / "s.png").exists()


def test_shard_missing_members_derive(copy, tmp_path, cli, one_line_error):
    shard = copy / "images-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    dropped = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name != dropped:
                tar.addfile(m, __import__("io").BytesIO(data))
    one_line_error(
        cli("bank", "derive", "--from", copy, "--noise", "0.2", "--out", tmp_path / "n", "--no-progress"),
        "has no 'png' member",
        dropped.split(".")[0],
    )


def test_show_into_a_folder(copy, tmp_path, cli, one_line_error):
    one_line_error(cli("bank", "show", copy, "--category", CATS[0], "-o", tmp_path), "is a folder", "-o")


def test_cuda_without_a_gpu(tmp_path, names, cli, one_line_error, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    one_line_error(
        cli("bank", "build", "--vocab", names, "--out", tmp_path / "b", *BUILD, "--device", "cuda"),
        "--device cuda",
        "--device cpu",
    )
    one_line_error(cli("bank", "encode", tmp_path / "b", "--encoder", "tiny", "--device", "cuda"), "no bank at")


def test_a_resolution_the_generator_cannot_make(tmp_path, names, cli, one_line_error):
    args = [
        "--generator",
        "tiny-sd",
        "--encoder",
        "tiny",
        "--encoder-weights",
        "none",
        "--templates",
        "1",
        "--resolution",
        "36",
        "--steps",
        "2",
        "--no-progress",
    ]
    one_line_error(
        cli("bank", "build", "--vocab", names, "--out", tmp_path / "b", *args), "--resolution 36", "multiples of 8"
    )


def test_bad_encode_size(copy, cli, one_line_error):
    one_line_error(
        cli("bank", "encode", copy, "--encoder", "tiny", "--encoder-weights", "none", "--encode-size", "100"),
        "--encode-size",
        "multiple of 32",
    )


def test_disk_full_names_the_path_keeps_nothing_half_written_and_resumes(
    tmp_path, names, built, cli, one_line_error, monkeypatch
):
    from bank import store as store_module

    real_add, calls = store_module.ShardWriter.add, []

    def add(self, key, files, features):
        calls.append(key)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_add(self, key, files, features)

    out = tmp_path / "b"
    monkeypatch.setattr(store_module.ShardWriter, "add", add)
    result = cli("bank", "build", "--vocab", names, "--out", out, *BUILD)
    one_line_error(result, "no space left", str(out / "tmp"), "run the same command again")
    assert list((out / "tmp").glob("*.tar")) == []  # the shard being written is gone, not kept half-written
    assert [s.name for s in out.glob("images-*.tar")] == ["images-000000.tar"]  # the one finished before
    monkeypatch.setattr(store_module.ShardWriter, "add", real_add)
    result = cli("bank", "build", "--vocab", names, "--out", out, *BUILD)  # space freed: the same command resumes
    assert result.exit_code == 0, result.output
    assert verify(out) == []
    a, b = Bank(built).prototypes(CATS, "tiny"), Bank(out).prototypes(CATS, "tiny")
    np.testing.assert_allclose(a.embedding.numpy(), b.embedding.numpy(), rtol=1e-2, atol=1e-2)


def test_files_honour_the_umask(built, tmp_path):
    from dpseg.io import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        atomic_write_bytes(tmp_path / "b.json", b"{}")
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    # a bank built under umask 022 (the test process's) is readable by another user
    for path in [
        built / "bank.json",
        built / "manifest.parquet",
        *built.glob("images-*.tar"),
        *(built / "staging").rglob("*.safetensors"),
    ]:
        assert path.stat().st_mode & 0o044 == 0o044, path
