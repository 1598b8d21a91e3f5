"""`dpseg segment` on a real photo from the fixtures: overlay PNG, detected classes, text-only
classes, --generate, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run
from PIL import Image

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "realseg"
PHOTO = FIXTURES / "voc2012" / "images" / "1_image.png"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("segment"), ["red solid circle"])


def test_segment_a_real_photo_writes_a_png_and_reports_areas(world, cli):
    out = world / "out"
    result = cli(
        "segment",
        PHOTO,
        "--classes",
        "red solid circle, aeroplane, sky",
        "--checkpoint",
        world / "ckpt",
        "--size",
        "64",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["text_only"] == ["aeroplane", "sky"] and report["passes"] == 2
    item = report["images"][0]
    with Image.open(item["output"]) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]  # image | pass I | pass II side by side
    h, w = np.asarray(Image.open(PHOTO)).shape[:2]
    assert sum(d["pixels"] for d in item["detected"]) == h * w  # predictions at the photo's own size
    assert {d["class"] for d in item["detected"]} <= {"red solid circle", "aeroplane", "sky"}
    assert json.loads((out / "segment.json").read_text()) == report
    plain = cli(
        "segment",
        PHOTO,
        "--classes",
        "red solid circle, sky",
        "--checkpoint",
        world / "ckpt",
        "--size",
        "64",
        "-o",
        world / "plain",
        "--passes",
        "1",
    )
    assert plain.exit_code == 0 and "text-only prompts (not in the bank): sky" in plain.stdout
    assert "1_image.png:" in plain.stdout


def test_generate_adds_missing_classes_to_the_bank(world, cli):
    from bank.reader import Bank

    result = cli(
        "segment",
        PHOTO,
        "--classes",
        "blue dotted star",
        "--checkpoint",
        world / "ckpt",
        "--size",
        "64",
        "-o",
        world / "gen",
        "--generate",
        "--passes",
        "1",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text_only"] == []
    assert "blue dotted star" in Bank(world / "bank").config["categories"]


def test_bad_inputs_are_one_line_errors(world, cli, one_line_error, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    one_line_error(cli("segment", bad, "--classes", "cat", "--checkpoint", world / "ckpt"), "is unreadable")
    one_line_error(
        cli("segment", tmp_path / "none.jpg", "--classes", "cat", "--checkpoint", world / "ckpt"), "does not exist"
    )
    one_line_error(cli("segment", PHOTO, "--classes", " , ", "--checkpoint", world / "ckpt"), "--classes is empty")
    one_line_error(cli("segment", PHOTO, "--classes", "cat, cat", "--checkpoint", world / "ckpt"), "twice")
    one_line_error(
        cli("segment", PHOTO, "--classes", str(tmp_path / "nope.txt"), "--checkpoint", world / "ckpt"), "does not exist"
    )
