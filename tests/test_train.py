"""Stage two on a tiny world: the loss falls, the run folder is complete and self-describing, the
checkpoint reproduces the trained network, and every bad input is one line before any compute."""

import json
import os

import pytest
import torch
from test_train_world import CLASS_IDS, flags, recipe, shared_world

from dpseg.data import shapes
from dpseg.errors import UserError
from pipeline.train.loop import read_metrics, recipe_from_params, train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    data, bank = world
    out = tmp_path_factory.mktemp("run") / "out"
    summary = train(recipe(data, bank, out, steps=32, checkpoint_every=10, val_every=16, val_images=4), progress=False)
    return out, summary


def test_the_loss_falls_over_32_steps(trained):
    out, summary = trained
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 32
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:4]) / 4
    assert summary["final_loss"] == pytest.approx(losses[-1], abs=1e-6)


def test_the_run_folder_says_what_made_it(trained, world):
    out, summary = trained
    data, bank = world
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert files == [
        "config.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng-rank0.safetensors",
        "state.json",
    ]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    extra = config["extra"]
    assert extra["step"] == 32 and json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 32
    # paths relative to the run folder: the folder moves together with what it names
    assert extra["bank"]["path"] == os.path.relpath(bank, out) and extra["bank"]["generator"] == "procedural"
    assert extra["dataset"] == extra["recipe"]["dataset"] == os.path.relpath(data, out)
    assert extra["bank"]["settings_hash"] == json.loads((bank / "bank.json").read_text())["generator"]["settings_hash"]
    assert extra["encoder"] == "tiny" and extra["encoder_weights"] == "random" and extra["encode_size"] == 64
    assert extra["vocabulary"]["class_ids"] == CLASS_IDS
    assert extra["vocabulary"]["class_names"] == [shapes.SHAPES_CATEGORIES[i] for i in CLASS_IDS]
    assert extra["recipe"]["steps"] == 32 and extra["recipe"]["templates"] == 2 and config["stored"] == "trainable"
    assert config["model"]["templates"] == 2 and config["model"]["prompt_mode"] == "dual"
    assert json.loads((out / "train.json").read_text()) == json.loads(json.dumps(summary))
    csv = (out / "loss.csv").read_text().splitlines()
    assert csv[0] == "step,loss,lr" and len(csv) == 33
    lrs = [m["lr"] for m in read_metrics(out) if "lr" in m]
    # cosine from the base lr, no warm-up
    assert lrs[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    vals = [m for m in read_metrics(out) if "val_miou" in m]
    assert [m["step"] for m in vals] == [16, 32] and 0 <= vals[-1]["val_pacc"] <= 1


def test_the_checkpoint_reproduces_the_trained_network(trained, world):
    from bank.reader import Bank
    from dpseg.data.readers import SegmentationDataset
    from dpseg.model import VisualPrompts, load_dpseg
    from pipeline.text_cache import cached_text_embeddings
    from pipeline.train.validate import Validator

    out, summary = trained
    data, bank = world
    model = load_dpseg(out / "checkpoint").eval()
    names = [shapes.SHAPES_CATEGORIES[i] for i in CLASS_IDS]
    protos = Bank(bank).prototypes(names, "tiny", 2, encode_size=64)
    visual = VisualPrompts(protos.embedding, {s: protos.pooled[s] for s in model.cfg.guidance_strides})
    text = cached_text_embeddings(model, names)
    # the in-memory network scored the validation images at the end of training; the loaded one agrees
    again = Validator(SegmentationDataset(data, "val"), CLASS_IDS, 64, 4)(model, text, visual, "cpu")
    assert again == summary["validation"]
    # and its weights are the trained ones, not the initial ones (the recipe's seed 0)
    from dpseg.model import build_dpseg

    torch.manual_seed(0)
    initial = build_dpseg(model.cfg, weights=None)
    assert any(
        not torch.equal(a, b) for a, b in zip(initial.decoder.parameters(), model.decoder.parameters(), strict=True)
    )


def test_rerunning_a_finished_run_trains_nothing_more(trained, world):
    out, summary = trained
    data, bank = world
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    again = train(recipe(data, bank, out, steps=32, checkpoint_every=10, val_every=16, val_images=4), progress=False)
    assert again["resumed_from"] == 32 and again["steps"] == 32
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    assert len([m for m in read_metrics(out) if "loss" in m]) == 32


def _assert_nothing_written(out):
    assert not out.exists() or not any(out.iterdir())


def test_bad_inputs_are_one_line_before_any_compute(world, tmp_path, cli, one_line_error):
    data, bank = world
    out = tmp_path / "out"
    base = flags(recipe(data, bank, out))

    def with_(**changes):
        args = list(base)
        for key, value in changes.items():
            flag = f"--{key.replace('_', '-')}"
            if flag in args:
                i = args.index(flag)
                del args[i : i + 2]
            args += [flag, str(value)]
        return ["train", *args, "--no-progress"]

    one_line_error(cli(*with_(dataset=tmp_path / "nowhere")), "nowhere")
    one_line_error(cli(*with_(classes="seen")), "has no 'tiny' prompts for 32 classes", "dpseg bank build")
    one_line_error(cli(*with_(encoder="convnext-b")), "no features for encoder 'convnext-b'", "dpseg bank encode")
    one_line_error(cli(*with_(encode_size=128)), "encoded at 64 px", "--encode-size 128")
    # the bank's only size (64) is not the segmenter's input (tiny: 128): refused unless given, naming the re-encode
    one_line_error(
        cli("train", *flags(recipe(data, bank, out, encode_size=None)), "--no-progress"),
        "encoded at 64 px only",
        "segmenter's input is 128 px",
        f"dpseg bank encode {bank} --encoder tiny --encode-size 128",
    )
    one_line_error(cli(*with_(crop_size=50)), "--crop-size", "multiple of 32")
    one_line_error(cli(*with_(batch_size=3, grad_accum=2)), "--batch-size 3", "--grad-accum")
    one_line_error(cli(*with_(prompt_mode="text")), "visual_guidance")
    one_line_error(cli(*with_(bank=tmp_path / "nobank")), "no bank at")
    one_line_error(cli(*with_(mixed_precision="fp8")), "--mixed-precision")
    one_line_error(cli("train", *base, "--model-overrides", "{not json"), "--model-overrides")
    _assert_nothing_written(out)
    with pytest.raises(UserError, match="unknown keys \\['stepz'\\]"):
        recipe_from_params({"dataset": str(data), "stepz": 3})


def test_a_damaged_checkpoint_is_one_line(world, tmp_path, cli, one_line_error):
    data, bank = world
    out = tmp_path / "out"
    train(recipe(data, bank, out, steps=2, checkpoint_every=0), progress=False)
    weights = out / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    one_line_error(
        cli("train", *flags(recipe(data, bank, out, steps=4)), "--no-progress"),
        "checkpoint",
        "is damaged",
        "--resume no",
    )
    assert weights.stat().st_size == 100  # left as found for the user to inspect
    one_line_error(
        cli("train", *flags(recipe(data, bank, out, steps=4, lr=0.5)), "--no-progress"), "another recipe", "lr"
    )


def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    world, tmp_path, cli, one_line_error, monkeypatch
):
    import dpseg.model.loss as loss_module

    data, bank = world
    out = tmp_path / "out"
    real, calls = loss_module.deep_supervision_bce, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) == 6 else value

    monkeypatch.setattr(loss_module, "deep_supervision_bce", poisoned)
    result = cli("train", *flags(recipe(data, bank, out, steps=10, checkpoint_every=4)), "--no-progress")
    one_line_error(result, "loss is nan at step 6", "step 4")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert not (out / "train.json").exists()


def test_every_split_of_a_global_batch_reads_the_same_samples():
    from pipeline.train.data import SampleStream, StreamLayout

    def global_batches(world, accum, steps=5, start=0):
        micro = 4 // (world * accum)
        seen = {}
        for rank in range(world):
            stream = SampleStream(6, 3, StreamLayout(4, micro, accum, world, rank), start, steps)
            items = list(stream)
            assert len(items) == len(stream)
            for k, item in enumerate(items):
                seen.setdefault(start + k // (micro * accum), []).append(item)
        return {step: sorted(items) for step, items in seen.items()}

    one = global_batches(1, 1)
    assert global_batches(2, 1) == global_batches(1, 2) == global_batches(2, 2) == one
    assert global_batches(2, 2, start=3) == {s: one[s] for s in (3, 4)}  # a resumed stream picks up in place
    indices = [i for i, _ in sorted((item for s in range(3) for item in one[s]), key=lambda item: item[1])]
    # 12 positions = 2 epochs of the 6 images, each epoch in its own order
    assert sorted(indices[:6]) == sorted(indices[6:]) == list(range(6)) and indices[:6] != indices[6:]
