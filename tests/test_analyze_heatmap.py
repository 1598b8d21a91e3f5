"""`dpseg analyze heatmap`: the cost maps against an independent computation, then the command on
a real photo (Fig. 3 panels; Fig. 8 stage maps with a checkpoint), sizes, ranges and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.analyze.heatmap import prompt_costs, template_mean_cost, upsample

PHOTO = Path(__file__).resolve().parent / "fixtures" / "realseg" / "ade20k" / "images" / "ADE_val_00000001.jpg"
CLASSES = ["red dotted triangle", "green striped square"]


def test_cost_maps_match_an_independent_computation():
    rng = np.random.default_rng(1)
    feats, text, visual = rng.normal(size=(1, 5, 3, 4)), rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    maps = prompt_costs(torch.tensor(feats), torch.tensor(text), torch.tensor(visual))
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    for n in range(2):
        for y in range(3):
            for x in range(4):
                f = unit(feats[0, :, y, x])
                t = [unit(text[n, m]) for m in range(3)]
                v = [unit(visual[n, m]) for m in range(3)]
                d = [(a + b) / 2 for a, b in zip(t, v, strict=True)]  # Eq. 1 (cosine ignores its norm)
                for kind, prompts in (("text", t), ("visual", v), ("dual", d)):
                    want = np.mean([f @ unit(p) for p in prompts])
                    assert float(maps[kind][n, y, x]) == pytest.approx(want, abs=1e-5)
    assert template_mean_cost(torch.tensor(feats), torch.tensor(text)).shape == (2, 3, 4)
    up = upsample(maps["visual"], (30, 40))
    assert up.shape == (2, 30, 40)
    assert up.min() >= maps["visual"].min() - 1e-6 and up.max() <= maps["visual"].max() + 1e-6


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
    from bank.build import BuildSettings, build_bank

    root = tmp_path_factory.mktemp("heat")
    (root / "vocab.txt").write_text("\n".join(CLASSES) + "\n")
    build_bank(
        BuildSettings(
            out=root / "bank",
            generator="procedural",
            vocab=[str(root / "vocab.txt")],
            encoder="tiny",
            encoder_weights=None,
            templates=2,
            progress=False,
        )
    )
    return root / "bank"


def test_heatmap_on_a_real_photo_writes_three_panels_per_class(bank_dir, tmp_path, cli):
    out = tmp_path / "heat.png"
    result = cli(
        "analyze", "heatmap", PHOTO, "--classes", ", ".join(CLASSES), "--bank", bank_dir, "--encoder", "tiny", "-o", out
    )
    assert result.exit_code == 0, result.output
    with Image.open(PHOTO) as photo:
        width, height = photo.size
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.size[0] > figure.size[1]  # 4 columns, 2 rows
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["classes"] == CLASSES and data["kinds"] == ["text", "visual", "dual"] and data["templates"] == 2
    size = data["size"]
    for kind in data["kinds"]:
        grid = np.array(data["stride32"][kind])
        assert grid.shape == (2, size // 32, size // 32)
        lo, hi = data["range"][kind]
        assert -1 <= lo <= hi <= 1 and grid.min() == pytest.approx(lo) and grid.max() == pytest.approx(hi)
    t, v = (np.array(data["stride32"][k]) for k in ("text", "visual"))
    assert not np.allclose(t, v)  # two different prompt sources, two different maps
    assert data["image_size"] == [height, width] and data["shape"] == [2, 3, height, width]  # upsampled to the photo


def test_heatmap_with_a_checkpoint_adds_the_stage_cost_volumes(bank_dir, tmp_path, cli):
    from dpseg.model import DPSegConfig, build_dpseg, save_dpseg

    torch.manual_seed(0)  # random towers as the bank's encoder builds them
    save_dpseg(build_dpseg(DPSegConfig(encoder="tiny", templates=2), weights=None), tmp_path / "ckpt")
    out = tmp_path / "fig.png"
    result = cli(
        "analyze",
        "heatmap",
        PHOTO,
        "--classes",
        CLASSES[0],
        "--bank",
        bank_dir,
        "--checkpoint",
        tmp_path / "ckpt",
        "--size",
        96,
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    stages = json.loads((tmp_path / "fig-stages.json").read_text())
    assert stages["strides"] == [16, 8, 4]
    for s in stages["strides"]:
        grid = np.array(stages["maps"][str(s)])
        assert grid.shape == (1, 96 // s, 96 // s)
        assert -1 <= grid.min() <= grid.max() <= 1
    with Image.open(tmp_path / "fig-stages.png") as figure:
        assert figure.format == "PNG"
    assert json.loads(out.with_suffix(".json").read_text())["size"] == 96


def test_heatmap_errors_are_one_line(bank_dir, tmp_path, cli, one_line_error):
    base = ["analyze", "heatmap", PHOTO, "--bank", bank_dir, "--encoder", "tiny"]
    one_line_error(cli(*base, "--classes", "purple unicorn", "-o", tmp_path / "a.png"), "purple unicorn")
    one_line_error(cli(*base, "--classes", " , ", "-o", tmp_path / "a.png"), "--classes is empty")
    one_line_error(cli(*base, "--classes", CLASSES[0], "-o", tmp_path / "a.txt"), "must end in .png")
    one_line_error(cli(*base, "--classes", CLASSES[0], "--size", 100, "-o", tmp_path / "a.png"), "multiple of 32")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    bad = cli(
        "analyze",
        "heatmap",
        tmp_path / "broken.jpg",
        "--bank",
        bank_dir,
        "--encoder",
        "tiny",
        "--classes",
        CLASSES[0],
        "-o",
        tmp_path / "a.png",
    )
    one_line_error(bad, "cannot read image")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "a.json").exists()
