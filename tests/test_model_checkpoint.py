"""Checkpoints: safetensors + config.json round trip, self-describing, atomic, clear errors."""

import json

import pytest
import torch

from dpseg.errors import UserError
from dpseg.model import DPSegConfig, build_dpseg, load_dpseg, save_dpseg
from dpseg.model.summary import random_prompts


def test_round_trip_gives_the_same_logits_and_config(tmp_path):
    torch.manual_seed(0)
    model = build_dpseg(DPSegConfig(encoder="tiny", fusion="avg-costs", templates=8), weights=None).eval()
    with torch.no_grad():  # make the checkpoint differ from any fresh init
        model.decoder.head.bias.fill_(0.25)
    text, visual = random_prompts(model, 3)
    images = torch.randn(1, 3, 64, 64)
    path = save_dpseg(model, tmp_path / "ckpt", extra={"step": 7})
    loaded = load_dpseg(path).eval()
    with torch.no_grad():
        assert torch.equal(model(images, text=text, visual=visual), loaded(images, text=text, visual=visual))
    assert loaded.cfg == model.cfg
    config = json.loads((path / "config.json").read_text())
    assert config["model"]["fusion"] == "avg-costs" and config["model"]["templates"] == 8
    assert config["encoder"]["open_clip_model"] == "dpseg-tiny-resnet"
    assert config["encoder_weights"] == "random" and config["extra"] == {"step": 7}


def test_frozen_towers_travel_with_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = build_dpseg(DPSegConfig(encoder="tiny"), weights=None)
    loaded = load_dpseg(save_dpseg(model, tmp_path / "c"))
    for name in ("prompt_encoder", "text_encoder", "image_encoder"):
        a, b = getattr(model, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in loaded.prompt_encoder.parameters())


def test_overwriting_replaces_the_whole_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_dpseg(DPSegConfig(encoder="tiny"), weights=None)
    path = save_dpseg(model, tmp_path / "c")
    (path / "stale.txt").write_text("from an older save")
    save_dpseg(model, path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary folder left behind


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="is not a dpseg checkpoint"):
        load_dpseg(tmp_path)
    torch.manual_seed(0)
    path = save_dpseg(build_dpseg(DPSegConfig(encoder="tiny"), weights=None), tmp_path / "c")
    (path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(UserError, match="could not load"):
        load_dpseg(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "format": "something-else"}))
    with pytest.raises(UserError, match="this dpseg reads 'dpseg-checkpoint-1'"):
        load_dpseg(path)
