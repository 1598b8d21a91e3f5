"""`dpseg eval` under `accelerate launch` on two CPU (gloo) ranks: the shards are split over the
ranks, the metrics, predictions and overlay shards equal what one process writes, and a resume
splits only the shards left."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import settings, world  # noqa: F401 (the fixture)
from test_train_world import run_cli

from pipeline.evaluate.loop import evaluate, rank_shards

LAUNCH = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
LAUNCH += ["--dynamo_backend", "no"]


def test_missing_shards_are_dealt_round_robin():
    assert rank_shards([0, 1, 2, 3, 4], 2, 0) == [0, 2, 4]
    assert rank_shards([0, 1, 2, 3, 4], 2, 1) == [1, 3]
    assert rank_shards([3], 2, 1) == []  # a rank may have nothing left to do on a resume
    assert sorted(
        rank_shards(list(range(7)), 3, 0) + rank_shards(list(range(7)), 3, 1) + rank_shards(list(range(7)), 3, 2)
    ) == list(range(7))


def _cli_args(root, out):
    s = settings(root, out, save_predictions=True)
    return [
        "eval",
        "--checkpoint", s.checkpoint, "--dataset", s.dataset, "--out", s.out, "--classes", s.classes,
        "--num-workers", "0", "--shard-size", str(s.shard_size), "--batch-size", str(s.batch_size),
        "--min-area", str(s.min_area), "--save-predictions", "--device", "cpu", "--no-progress", "--json",
    ]  # fmt: skip


def _comparable(metrics: dict) -> dict:
    m = {k: v for k, v in metrics.items() if k != "ranks"}
    m["settings"] = {k: v for k, v in metrics["settings"].items() if k != "out"}
    return m


def _tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _assert_same_outputs(a, b):
    overlays = sorted(p.name for p in (a / "overlays").glob("*.tar"))
    assert (
        overlays
        == sorted(p.name for p in (b / "overlays").glob("*.tar"))
        == ["overlay-000000.tar", "overlay-000001.tar"]
    )
    for name in overlays:
        ma, mb = _tar_members(a / "overlays" / name), _tar_members(b / "overlays" / name)
        assert len({k.split(".")[0] for k in ma}) == 2 and ma == mb, name  # json + refined features, byte for byte
    for p in ("pass1", "pass2"):
        pngs = sorted(x.name for x in (a / "pred" / p).glob("*.png"))
        assert len(pngs) == 4 and pngs == sorted(x.name for x in (b / "pred" / p).glob("*.png"))
        for name in pngs:
            assert np.array_equal(
                np.asarray(Image.open(a / "pred" / p / name)), np.asarray(Image.open(b / "pred" / p / name))
            )


@pytest.mark.slow
def test_two_cpu_ranks_write_what_one_process_writes_and_resume_per_rank(world):  # noqa: F811
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks: the same kernels and reduction order
    try:
        one = evaluate(settings(world, "one-process", save_predictions=True), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert one["ranks"] == 1

    out = world / "two-ranks"
    proc = run_cli(_cli_args(world, "two-ranks"), launch=LAUNCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)  # only the main rank reports: one JSON document
    assert two["ranks"] == 2  # two real ranks (a plain PartialState on CPU would give two rank 0s)
    assert _comparable(two) == _comparable(one)
    assert json.loads((out / "metrics.json").read_text()) == two
    _assert_same_outputs(world / "one-process", out)

    # a kill during shard 1 (rank 1's): the resume on two ranks redoes only that shard, on rank 0
    (out / ".parts" / "part-000001.npy").unlink()
    (out / "overlays" / "overlay-000001.tar").unlink()
    (out / "metrics.json").unlink()
    done = (out / ".parts" / "part-000000.npy").stat().st_mtime_ns
    proc = run_cli(_cli_args(world, "two-ranks"), launch=LAUNCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / ".parts" / "part-000000.npy").stat().st_mtime_ns == done
    assert _comparable(json.loads(proc.stdout)) == _comparable(one)
    _assert_same_outputs(world / "one-process", out)
