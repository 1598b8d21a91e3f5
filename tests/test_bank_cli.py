"""The bank from the command line: build -> SIGKILL -> resume -> verify/info; derive; encode;
show; a 2-rank CPU build via accelerate launch; every bad input is one `Error:` line."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import bank_build_flags, write_vocab
from PIL import Image

from bank.encode import PromptEncoder
from bank.generators.noise import blend
from bank.inspection import verify
from bank.merge import read_manifest
from bank.store import BankStore, ShardReader
from dpseg.clip.encoders import ENCODERS, EncoderSpec

REPO = Path(__file__).resolve().parents[1]
BUILD = bank_build_flags("tiny-sd", templates=3, steps=2)


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("vocab"), ["cat", "dog", "building, edifice"])


@pytest.fixture(scope="module")
def built(tmp_path_factory, names, cli):
    """The 'done when' path: CLI build, SIGKILL mid-run, resume, verify, info."""
    out = tmp_path_factory.mktemp("cli") / "bank"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "bank", "build", "--vocab", str(names), "--out", str(out), *BUILD],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(out.glob("images-000001.tar")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_early = proc.returncode == -signal.SIGKILL
    result = cli("bank", "build", "--vocab", names, "--out", out, *BUILD)
    assert result.exit_code == 0, result.output
    return out, killed_early


def test_killed_cli_build_resumes_verifies_and_counts_each_entry_once(built, cli):
    out, killed_early = built
    assert killed_early
    result = cli("bank", "verify", out)
    assert result.exit_code == 0 and "ok" in result.output
    report = json.loads(cli("bank", "info", out, "--json").output)
    assert report["entries"] == 9 and report["categories"] == 3 and report["templates"] == 3
    assert (
        report["failed"] == 0
        and report["missing"] == 0
        and report["generator"] == "tiny-sd"
        and report["encoders"] == ["tiny"]
    )
    table, _ = read_manifest(BankStore(out))
    assert table.num_rows == 9 and len(set(table.column("key").to_pylist())) == 9


def test_derive_noise_bank_matches_the_documented_blend(built, cli, tmp_path):
    src, _ = built
    result = cli("bank", "derive", "--from", src, "--noise", "0.3", "--out", tmp_path / "noisy", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(cli("bank", "info", tmp_path / "noisy", "--json").output)
    assert report["generator"] == "noise:0.3" and report["entries"] == 9 and report["derived_from"]["ratio"] == 0.3
    assert verify(tmp_path / "noisy") == []
    source = {r["prompt"]: r for r in read_manifest(BankStore(src))[0].to_pylist()}
    for r in read_manifest(BankStore(tmp_path / "noisy"))[0].to_pylist()[:3]:
        s = source[r["prompt"]]
        with ShardReader(src / s["shard"]) as a, ShardReader(tmp_path / "noisy" / r["shard"]) as b:
            x = np.asarray(Image.open(io.BytesIO(a.read(s["key"], "png")))).astype(np.float32) / 255
            y = np.asarray(Image.open(io.BytesIO(b.read(r["key"], "png")))).astype(np.float32)
        eps = (
            torch.randn((3, *x.shape[:2]), generator=torch.Generator().manual_seed(r["seed"])).permute(1, 2, 0).numpy()
        )
        expect = np.clip(((1 - 0.3) * (2 * x - 1) + 0.3 * eps + 1) / 2, 0, 1) * 255
        assert np.abs(expect - y).max() <= 0.51
    # the blend itself: r = 0 is the identity
    img = torch.rand(3, 8, 8)
    torch.testing.assert_close(blend(img, 0.0, torch.Generator().manual_seed(1)), img)


def test_encode_adds_a_features_group_from_stored_images(built, cli):
    out, _ = built
    if "tiny-b" not in ENCODERS:
        ENCODERS.register("tiny-b", EncoderSpec("tiny-b", "dpseg-tiny-resnet", None, 128, 96))
    result = cli("bank", "encode", out, "--encoder", "tiny-b", "--encoder-weights", "none", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads(cli("bank", "info", out, "--json").output)["encoders"] == ["tiny", "tiny-b"]
    group = zarr.open_group(str(out / "features.zarr" / "tiny-b@128"), mode="r")
    enc = PromptEncoder("tiny-b", None)
    table = read_manifest(BankStore(out))[0].to_pylist()
    r = table[4]
    with ShardReader(out / r["shard"]) as reader:
        pixels = np.asarray(Image.open(io.BytesIO(reader.read(r["key"], "png"))))
    expect = enc(pixels[None])["embedding"][0]
    row = group.attrs["categories"].index(r["category"])
    np.testing.assert_allclose(group["embedding"][row, r["template"]], expect, rtol=1e-2, atol=1e-2)
    assert verify(out) == []


def test_show_writes_a_contact_sheet(built, cli, tmp_path):
    out, _ = built
    result = cli("bank", "show", out, "--category", "building, edifice", "-o", tmp_path / "sheet.png", "--tile", "32")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.size == (3 * 32, 32 + 14)


def test_verify_lists_a_truncated_shard_and_a_lost_feature_part(built, cli, tmp_path):
    import shutil

    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = sorted(copy.glob("images-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:700])
    (copy / "staging" / "tiny@128" / sorted(copy.glob("images-*.tar"))[1].name.replace(".tar", ".safetensors")).unlink()
    result = cli("bank", "verify", copy)
    assert result.exit_code == 1
    assert shard.name in result.output and "no feature part" in result.output


@pytest.mark.parametrize(
    "args,needles",
    [
        (
            ["bank", "build", "--generator", "nope", "--vocab", "voc-20", "--encoder", "tiny", "--out", "{tmp}/x"],
            ["unknown generator 'nope'", "tiny-sd"],
        ),
        (
            ["bank", "build", "--generator", "noise:0.5", "--vocab", "voc-20", "--encoder", "tiny", "--out", "{tmp}/x"],
            ["bank derive"],
        ),
        (
            [
                "bank",
                "build",
                "--generator",
                "procedural",
                "--vocab",
                "no-such-vocab",
                "--encoder",
                "tiny",
                "--out",
                "{tmp}/x",
            ],
            ["no-such-vocab"],
        ),
        (
            [
                "bank",
                "build",
                "--generator",
                "procedural",
                "--vocab",
                "shapes",
                "--encoder",
                "nope",
                "--out",
                "{tmp}/x",
            ],
            ["unknown encoder 'nope'"],
        ),
        (
            [
                "bank",
                "build",
                "--generator",
                "sd15",
                "--model",
                "{tmp}/missing.safetensors",
                "--vocab",
                "voc-20",
                "--encoder",
                "tiny",
                "--out",
                "{tmp}/x",
                "--device",
                "cpu",
            ],
            ["missing.safetensors"],
        ),
        (["bank", "info", "{tmp}/nothing"], ["no bank at", "bank build"]),
        (["bank", "verify", "{tmp}/nothing"], ["no bank at"]),
        (["bank", "show", "{tmp}/nothing", "--category", "cat", "-o", "{tmp}/s.png"], ["no bank at"]),
        (["bank", "encode", "{tmp}/nothing", "--encoder", "tiny"], ["no bank at"]),
        (["bank", "derive", "--from", "{tmp}/nothing", "--noise", "0.5", "--out", "{tmp}/y"], ["no bank at"]),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, args, needles, cli, one_line_error):
    one_line_error(cli(*[a.format(tmp=tmp_path) for a in args]), *needles)


def test_bad_inputs_on_an_existing_bank(built, tmp_path, names, cli, one_line_error):
    out, _ = built
    one_line_error(
        cli("bank", "show", out, "--category", "unicorn", "-o", tmp_path / "s.png"), "no entries for category 'unicorn'"
    )
    one_line_error(cli("bank", "derive", "--from", out, "--noise", "1.5", "--out", tmp_path / "n"), "[0, 1]")
    one_line_error(
        cli("bank", "build", "--vocab", names, "--out", out, *BUILD[:-1], "--seed", "7"), "holds a bank of generator"
    )
    one_line_error(
        cli("bank", "build", "--vocab", names, "--out", out, *BUILD, "--shard-index", "3", "--num-shards", "2"),
        "--shard-index",
    )
    one_line_error(
        cli("bank", "encode", out, "--encoder", "tiny", "--encoder-weights", str(tmp_path / "w.safetensors")),
        "w.safetensors",
    )
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "n").exists()


@pytest.mark.slow
def test_two_rank_cpu_build_with_accelerate_equals_one_process(built, tmp_path, names):
    out = tmp_path / "ranks"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "cli.main",
        "bank",
        "build",
        "--vocab",
        str(names),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--json",
        *BUILD,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["ranks"] == 2 and report["ok"] == 9
    table = read_manifest(BankStore(out))[0].to_pylist()
    assert sorted({r["rank"] for r in table}) == [0, 1]
    single = {r["key"]: r for r in read_manifest(BankStore(built[0]))[0].to_pylist()}
    assert {r["key"] for r in table} == set(single)
    for r in table:
        s = single[r["key"]]
        with ShardReader(out / r["shard"]) as a, ShardReader(built[0] / s["shard"]) as b:
            x = np.asarray(Image.open(io.BytesIO(a.read(r["key"], "png")))).astype(int)
            y = np.asarray(Image.open(io.BytesIO(b.read(s["key"], "png")))).astype(int)
        assert np.abs(x - y).max() <= 1
    assert verify(out) == []


def test_a_corrupt_image_is_one_line_whose_advice_repairs_the_bank(built, tmp_path, names, cli, one_line_error):
    import shutil
    import tarfile

    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = sorted(copy.glob("images-*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_png = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w") as tar:  # same samples, the first PNG damaged
        for m, data in members:
            data = b"\x89PNG garbage" if m.name == first_png else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    shutil.rmtree(copy / "staging" / "tiny@128")
    shutil.rmtree(copy / "features.zarr" / "tiny@128")
    one_line_error(
        cli("bank", "encode", copy, "--encoder", "tiny", "--encoder-weights", "none", "--no-progress"),
        shard.name,
        "not a readable PNG",
        "move that shard out of the bank folder",
    )
    shutil.move(shard, tmp_path / shard.name)  # the advice, followed to the letter
    result = cli("bank", "build", "--vocab", names, "--out", copy, *BUILD)
    assert result.exit_code == 0, result.output
    assert verify(copy) == [] and json.loads(cli("bank", "info", copy, "--json").stdout)["entries"] == 9
