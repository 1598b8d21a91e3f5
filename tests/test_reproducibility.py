"""Same commit, same params, same thread count -> the same bytes: a short data -> clip -> bank ->
train -> eval -> seeds chain of the demo pipeline, run twice in fresh processes (other PYTHONHASHSEEDs,
other folders, 2 threads, where torch's multi-threaded CPU kernels differ run to run without its
deterministic mode), gives identical CLIP weights, bank features, checkpoint and metrics."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dpseg.errors import UserError
from pipeline.profiles import resolve

REPO = Path(__file__).resolve().parents[1]
THREADS = 2
CKPT = "out/train/checkpoint/config.json"

PARAMS = {
    "profile": "demo",
    "threads": THREADS,
    "data": {"images": 4, "val_images": 4, "size": 64},
    # big enough for the multi-threaded kernels that differ run to run without deterministic mode
    # (measured: batch 16 x 4 templates differs in 3 of 3 runs; batch 8 x 2 never does)
    "clip": {"steps": 3, "templates": 4, "templates_per_step": 4, "renders": 1, "batch_size": 16, "warmup": 1},
    "bank": {"templates": 2, "batch_size": 32},
    "train": {"steps": 3, "batch_size": 2, "crop_size": 64, "log_every": 1},
    "eval": {"sets": ["seen"], "limit": 4, "batch_size": 2, "passes": 2},
}

CHAIN = """
from pipeline.stages import run_stage
for stage in ("data", "clip", "bank-base", "bank", "train"):
    run_stage(stage, "params.yaml", progress=False)
run_stage("eval", "params.yaml", "seen", progress=False)
run_stage("seeds", "params.yaml", progress=False)
"""


def run_chain(folder: Path, hash_seed: str) -> None:
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # the params' thread count decides, not the shell's
    done = subprocess.run(
        [sys.executable, "-c", CHAIN], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bank_features(root: Path) -> dict[str, bytes]:
    """Every features array of the bank, as bytes (its attributes name absolute paths: left out)."""
    import zarr

    out = {}
    group = zarr.open_group(str(root / "features.zarr"), mode="r")
    for name, sub in sorted(group.groups()):
        for array_name, array in sorted(sub.arrays()):
            out[f"{name}/{array_name}"] = np.asarray(array[...]).tobytes()
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    run_chain(root / "a", "1")
    run_chain(root / "b", "2")
    return root / "a", root / "b"


def test_two_runs_give_the_same_bytes_at_every_stage(two_runs):
    a, b = two_runs
    assert sha(a / "out/clip/tiny.safetensors") == sha(b / "out/clip/tiny.safetensors")  # CLIP weights
    assert (a / "out/clip/metrics.json").read_text() == (b / "out/clip/metrics.json").read_text()
    fa, fb = bank_features(a / "out/bank"), bank_features(b / "out/bank")
    assert fa and fa == fb  # bank features
    ckpt = "out/train/checkpoint/model.safetensors"
    assert sha(a / ckpt) == sha(b / ckpt)  # checkpoint
    assert (a / "metrics/eval/seen.json").read_text() == (b / "metrics/eval/seen.json").read_text()
    ma, mb = (json.loads((x / "out/eval/seen/metrics.json").read_text()) for x in (a, b))
    assert ma["passes"] == mb["passes"]  # per-class IoUs of both passes, to the last bit
    seed1 = "out/seeds/seed-1/train/checkpoint/model.safetensors"  # the demo's second training seed
    assert sha(a / seed1) == sha(b / seed1) != sha(a / ckpt)
    assert (a / "metrics/seeds.json").read_text() == (b / "metrics/seeds.json").read_text()


def test_the_seed_stage_trains_and_evaluates_a_second_seed_as_the_main_one(two_runs):
    a, _ = two_runs
    main, other = (
        json.loads((a / p).read_text())["extra"] for p in (CKPT, "out/seeds/seed-1/train/checkpoint/config.json")
    )
    assert (main["recipe"]["seed"], other["recipe"]["seed"]) == (0, 1)
    paths = ("dataset", "bank", "encoder_weights", "out")  # recorded relative to each run's folder

    def recipe(extra):
        return {k: v for k, v in extra["recipe"].items() if k not in ("seed", *paths)}

    assert recipe(other) == recipe(main)
    assert other["recipe"]["bank"] == "../../../bank" and main["recipe"]["bank"] == "../bank"
    spread = json.loads((a / "metrics/seeds.json").read_text())["seeds"]
    evaluated = json.loads((a / "out/seeds/seed-1/eval/seen/metrics.json").read_text())
    assert spread["1"]["seen"]["pass2"]["miou"] == evaluated["passes"]["2"]["miou"] and evaluated["images"] == 4
    assert evaluated["settings"]["checkpoint"] == "out/seeds/seed-1/train/checkpoint"


def test_every_stage_records_its_thread_count_and_library_versions(two_runs):
    a, _ = two_runs
    records = {
        "clip config": json.loads((a / "out/clip/config.json").read_text())["environment"],
        "clip metrics": json.loads((a / "out/clip/metrics.json").read_text())["environment"],
        "bank": json.loads((a / "out/bank/bank.json").read_text())["environment"],
        "bank encoder": json.loads((a / "out/bank/bank.json").read_text())["encoders"]["tiny"]["environment"],
        "checkpoint": json.loads((a / "out/train/checkpoint/config.json").read_text())["extra"]["environment"],
        "eval": json.loads((a / "out/eval/seen/metrics.json").read_text())["environment"],
    }
    import torch

    for where, env in records.items():
        assert env["threads"] == THREADS and env["deterministic"] is True, where
        assert env["torch"] == torch.__version__ and all(env[k] for k in ("numpy", "open_clip_torch", "timm")), where
    assert "train_s" not in json.loads((a / "out/clip/metrics.json").read_text())  # timings apart: timings.json
    assert "train_s" in json.loads((a / "out/clip/timings.json").read_text())


def test_threads_come_from_the_profile_unless_params_set_them():
    assert resolve({"profile": "demo"})["threads"] == 2
    assert resolve({"profile": "demo", "threads": 1})["threads"] == 1
    assert resolve({"profile": "paper-b"})["threads"] is None  # GPU clusters: torch's default
    with pytest.raises(UserError, match="params.yaml threads: a positive whole number"):
        resolve({"profile": "demo", "threads": 0})
