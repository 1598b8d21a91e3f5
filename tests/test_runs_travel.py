"""Runs that travel and never mix: a run folder moved with its bank evaluates and segments
elsewhere without the weights file it was trained with; one writer per output folder; files
follow the umask; inline class lists; write failures and loader-worker errors as one line."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_world import CLASS_IDS, REPO, recipe

from dpseg.data import shapes

NAMES = [shapes.SHAPES_CATEGORIES[i] for i in CLASS_IDS]


@pytest.fixture(scope="module")
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def world(tmp_path_factory, umask022):
    """A dataset, CLIP weights in a *file*, a bank encoded with them and a 4-step run trained
    with them, made with paths relative to `root` (the directory they were made from)."""
    import open_clip  # noqa: F401  (the tiny config is registered by dpseg.clip)
    import torch
    from safetensors.torch import save_file

    from bank.build import BuildSettings, build_bank
    from dpseg.clip.encoders import ENCODERS, create_open_clip
    from dpseg.data.synth import write_shapes_benchmark
    from pipeline.train.loop import train

    root = tmp_path_factory.mktemp("travel")
    write_shapes_benchmark(root / "data", images=8, size=64, val_images=4, progress=False)
    torch.manual_seed(5)  # not seed 0: these towers differ from the random ones
    clip, _ = create_open_clip(ENCODERS.get("tiny"), weights=None)
    (root / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(root / "clip" / "tiny.safetensors"))
    (root / "names.txt").write_text("".join(n + "\n" for n in NAMES))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        build_bank(
            BuildSettings(
                out="bank",
                generator="procedural",
                vocab=["names.txt"],
                encoder="tiny",
                encoder_weights="clip/tiny.safetensors",
                encode_size=64,
                templates=2,
                batch_size=8,
                progress=False,
            )
        )
        train(
            recipe(
                Path("data"),
                Path("bank"),
                Path("run"),
                steps=4,
                checkpoint_every=2,
                encoder_weights="clip/tiny.safetensors",
            ),
            progress=False,
        )
    finally:
        os.chdir(cwd)
    return root


def eval_args(checkpoint, data, out, *extra, workers: int = 0):
    return [
        "eval",
        "--checkpoint",
        checkpoint,
        "--dataset",
        data,
        "--out",
        out,
        "--classes",
        ",".join(str(i) for i in CLASS_IDS),
        "--num-workers",
        str(workers),
        "--shard-size",
        "2",
        "--min-area",
        "16",
        "--no-progress",
        *extra,
    ]


def photo(world) -> Path:
    return next((world / "data" / "images" / "val").iterdir())


def test_a_moved_run_evaluates_and_segments_elsewhere_without_its_weights_file(
    world, tmp_path, cli, one_line_error, monkeypatch
):
    # before the move, from the directory the run was made in
    monkeypatch.chdir(world)
    before = cli(*eval_args("run/checkpoint", "data", "eval-before"))
    assert before.exit_code == 0, before.output
    seg = ["segment", photo(world), "--classes", ", ".join(NAMES), "--checkpoint", "run/checkpoint", "--json"]
    seg_before = cli(*seg, "-o", "seg-before")
    assert seg_before.exit_code == 0, seg_before.output
    config = json.loads((world / "run" / "checkpoint" / "config.json").read_text())
    assert config["encoder_weights"] == "encoder.safetensors" and config["extra"]["bank"]["path"] == "../bank"
    assert (world / "run" / "checkpoint" / "encoder.safetensors").read_bytes() == (
        world / "clip" / "tiny.safetensors"
    ).read_bytes()

    # move the run folder and its bank elsewhere, delete the weights file, work from another directory
    moved = tmp_path / "elsewhere" / "project"
    moved.mkdir(parents=True)
    shutil.copytree(world / "run", moved / "run")  # copies: the module's other tests keep the originals
    shutil.copytree(world / "bank", moved / "bank")
    shutil.move(world / "clip", tmp_path / "clip-gone")
    try:
        shutil.rmtree(tmp_path / "clip-gone")
        other = tmp_path / "cwd"
        other.mkdir()
        monkeypatch.chdir(other)
        after = cli(*eval_args(moved / "run" / "checkpoint", world / "data", "eval-after"))
        assert after.exit_code == 0, after.output
        seg_after = cli(*[moved / "run" / "checkpoint" if a == "run/checkpoint" else a for a in seg], "-o", "seg")
        assert seg_after.exit_code == 0, seg_after.output
    finally:
        (world / "clip").mkdir(exist_ok=True)

    a = json.loads((world / "eval-before" / "metrics.json").read_text())
    b = json.loads((other / "eval-after" / "metrics.json").read_text())
    assert a["passes"] == b["passes"] and sorted(a["passes"]) == ["1", "2"]
    assert a["settings"]["encoder_weights"] == b["settings"]["encoder_weights"]  # by digest, not by path
    assert a["settings"]["encoder_weights"].startswith("sha256:")
    assert [i["detected"] for i in json.loads(seg_before.stdout)["images"]] == [
        i["detected"] for i in json.loads(seg_after.stdout)["images"]
    ]

    # a bank that is not where the run recorded it: the line names --bank
    shutil.rmtree(moved / "bank")
    one_line_error(cli(*eval_args(moved / "run" / "checkpoint", world / "data", "eval-3")), "--bank")
    one_line_error(cli(*[moved / "run" / "checkpoint" if a == "run/checkpoint" else a for a in seg]), "--bank")


def test_given_encoder_weights_must_be_the_ones_trained_with(world, tmp_path, cli, one_line_error):
    import torch
    from safetensors.torch import save_file

    from dpseg.clip.encoders import ENCODERS, create_open_clip

    torch.manual_seed(6)
    clip, _ = create_open_clip(ENCODERS.get("tiny"), weights=None)
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(wrong))
    ckpt = world / "run" / "checkpoint"
    args = eval_args(ckpt, world / "data", tmp_path / "e", "--passes", "1", "--limit", "1")
    one_line_error(cli(*args, "--encoder-weights", wrong), "was encoded with", "--encoder-weights")
    copy = tmp_path / "same.safetensors"
    shutil.copyfile(ckpt / "encoder.safetensors", copy)
    assert cli(*args, "--encoder-weights", copy).exit_code == 0  # the same bytes at another path


def test_checkpoint_and_overlay_files_are_644_under_umask_022(world, cli, monkeypatch):
    monkeypatch.chdir(world)
    result = cli(*eval_args("run/checkpoint", "data", "eval-mode", "--passes", "2", "--limit", "2"))
    assert result.exit_code == 0, result.output
    files = list((world / "run" / "checkpoint").iterdir()) + list((world / "eval-mode" / "overlays").iterdir())
    files += [world / "eval-mode" / "metrics.json", world / "run" / "metrics.jsonl"]
    names = {p.name for p in files}
    assert {"model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors", "encoder.safetensors"} <= names
    assert "overlay-000000.tar" in names
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


def test_tensor_files_follow_any_umask(tmp_path):
    import torch

    from dpseg.io import save_tensors

    for mask, mode in ((0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            save_tensors(tmp_path / f"{mask}.safetensors", {"x": torch.zeros(2)})
        finally:
            os.umask(old)
        assert (tmp_path / f"{mask}.safetensors").stat().st_mode & 0o777 == mode


# ---- one writer per output folder -------------------------------------------------------------


def hold(folder: Path, command: str) -> subprocess.Popen:
    """Another process holding `folder`'s lock until its stdin closes."""
    code = (
        "import sys; from dpseg.io import folder_lock\n"
        f"with folder_lock({str(folder)!r}, {command!r}):\n"
        "    print('held', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def train_args(world, out, **overrides):
    from test_train_world import flags

    r = recipe(
        world / "data",
        world / "bank",
        out,
        steps=4,
        checkpoint_every=2,
        encoder_weights=str(world / "run" / "checkpoint" / "encoder.safetensors"),
        **overrides,
    )
    return ["train", *flags(r), "--no-progress"]


def test_a_second_train_and_a_second_eval_into_a_folder_in_use_refuse_in_one_line(world, tmp_path, cli, one_line_error):
    run = world / "run-in-use"  # beside the original: the paths it records still hold
    shutil.copytree(world / "run", run)
    before = {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()}
    holder = hold(run, "dpseg train")
    try:
        one_line_error(cli(*train_args(world, run)), "another `dpseg train`", f"pid {holder.pid}", "wait for it")
    finally:
        holder.communicate("")
    assert {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()} == before  # untouched
    assert not (run / ".lock").exists()  # the holder removed its lock file

    out = tmp_path / "eval"
    holder = hold(out, "dpseg eval")
    try:
        result = cli(*eval_args(world / "run" / "checkpoint", world / "data", out, "--limit", "1"))
        one_line_error(result, "another `dpseg eval`", f"pid {holder.pid}")
    finally:
        holder.communicate("")
    assert not out.exists()  # the folder the holder made (and wrote nothing into) is gone with it
    assert cli(*eval_args(world / "run" / "checkpoint", world / "data", out, "--limit", "1")).exit_code == 0


def test_a_stale_lock_is_reported_in_one_line_and_taken_over(world, tmp_path, cli):
    import socket

    run = world / "run-stale"
    shutil.copytree(world / "run", run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x", "command": "dpseg train"}
    (run / ".lock").write_text(json.dumps(record))
    result = cli(*train_args(world, run), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from"] == 4
    notes = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and f"pid {record['pid']} on this host" in notes[0] and "no longer running" in notes[0]
    assert not (run / ".lock").exists()

    (run / ".lock").write_text(json.dumps({**record, "host": "node-17"}))  # killed on another node
    result = cli(*train_args(world, run), "--json")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and "host node-17" in notes[0] and "lock is free" in notes[0]


def test_the_other_ranks_of_a_launch_hold_no_lock(tmp_path):
    from dpseg.io import folder_lock

    with folder_lock(tmp_path, "dpseg train"), folder_lock(tmp_path, "dpseg train", hold=False):
        pass  # rank 1 enters while rank 0 holds the folder
    with pytest.raises(Exception, match="another `dpseg train`"), folder_lock(tmp_path, "dpseg train"):
        with folder_lock(tmp_path, "dpseg train"):
            pass


# ---- --classes ---------------------------------------------------------------------------------


def test_inline_class_lists_are_names_whatever_their_length_or_characters(world, tmp_path, cli, one_line_error):
    from dpseg.data.vocab import parse_classes
    from dpseg.errors import UserError

    many = [f"thing number {i}" for i in range(2000)]
    assert parse_classes(", ".join(many)) == many
    assert parse_classes("car, truck/lorry") == ["car", "truck/lorry"]
    assert parse_classes("truck/lorry") == ["truck/lorry"]
    assert parse_classes("shapes") == list(shapes.SHAPES_CATEGORIES)
    for bad, fragment in (("", "no classes"), (" , ,", "no classes"), (", ".join(many + ["thing number 7"]), "twice")):
        with pytest.raises(UserError, match=fragment) as err:
            parse_classes(bad)
        assert len(str(err.value)) < 300 and "\n" not in str(err.value)
    assert "… and 1998 more" in str(err.value)

    base = ["segment", photo(world), "--checkpoint", world / "run" / "checkpoint", "-o", tmp_path, "--json"]
    result = cli(*base, "--classes", f"{NAMES[0]}, truck/lorry", "--passes", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text_only"] == ["truck/lorry"]  # not in the bank: text-only
    result = cli(*base, "--classes", ", ".join(many[:300]), "--passes", "1")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["text_only"]) == 300
    long_dup = cli(*base, "--classes", ", ".join(many + ["thing number 7"]))
    one_line_error(long_dup, "twice", "… and 1998 more")
    assert len(long_dup.stderr.strip()) < 300


# ---- write failures and loader workers ---------------------------------------------------------


def limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """`dpseg ARGS` in a fresh process whose files may not grow past `limit` bytes (ulimit -f)."""

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=cap,
    )


def assert_write_failure(result, file_fragment: str):
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith("Error: ") and file_fragment in lines[0], lines[0]
    assert "file-size limit" in lines[0] and "writing it needs" in lines[0] and "run the same command again" in lines[0]


@pytest.mark.slow
def test_a_file_size_limit_during_training_is_one_line_and_the_rerun_resumes(world, tmp_path, cli):
    out = tmp_path / "run"
    limit = (world / "run" / "checkpoint" / "model.safetensors").stat().st_size // 2
    result = limited(train_args(world, out), limit)
    assert_write_failure(result, str(out / "checkpoint"))
    assert not (out / "checkpoint").exists() and not (out / ".checkpoint-new").exists()  # nothing half-written
    again = cli(*train_args(world, out), "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["steps"] == 4
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_file_size_limit_during_eval_is_one_line_and_the_rerun_resumes(world, tmp_path, cli):
    ckpt, data = world / "run" / "checkpoint", world / "data"
    out = tmp_path / "eval"
    result = limited(eval_args(ckpt, data, out), 8192)  # a tar shard is at least 10240 bytes
    assert_write_failure(result, str(out / "overlays" / "overlay-000000.tar"))
    assert not list((out / "overlays").glob("*.tar")) and not list((out / "overlays").glob(".*"))
    again = cli(*eval_args(ckpt, data, out))
    assert again.exit_code == 0, again.output
    clean = cli(*eval_args(ckpt, data, tmp_path / "clean"))
    assert clean.exit_code == 0, clean.output
    a, b = (json.loads((d / "metrics.json").read_text())["passes"] for d in (out, tmp_path / "clean"))
    assert a == b


@pytest.mark.slow
def test_a_file_size_limit_during_a_bank_build_is_one_line_and_the_rerun_resumes(tmp_path, cli):
    from conftest import bank_build_flags, write_vocab

    names = write_vocab(tmp_path, NAMES[:3])
    args = ["bank", "build", "--vocab", names, "--out", tmp_path / "bank", *bank_build_flags()]
    result = limited(args, 8192)
    assert_write_failure(result, str(tmp_path / "bank" / "tmp"))
    assert not list((tmp_path / "bank").glob("images-*.tar")) and not list((tmp_path / "bank" / "tmp").iterdir())
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert json.loads(cli("bank", "info", tmp_path / "bank", "--json").stdout)["entries"] == 9


def test_a_corrupt_image_read_by_a_loader_worker_is_the_main_process_line(world, tmp_path, cli, one_line_error):
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    image = sorted((data / "images" / "val").iterdir())[1]
    image.write_bytes(b"not an image")
    ckpt = world / "run" / "checkpoint"
    lines = []
    for workers in (0, 2):  # 2: the default
        result = cli(*eval_args(ckpt, data, tmp_path / f"eval-{workers}", "--passes", "1", workers=workers))
        one_line_error(result, str(image), "unreadable")
        lines.append(result.stderr.strip())
    assert lines[0] == lines[1]
