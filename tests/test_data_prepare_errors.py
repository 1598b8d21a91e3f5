"""`data prepare` on bad input: one clear error naming the file, skip-and-record on request,
resuming, and refusing to mix outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpseg.data.datasets import prepare_dataset
from dpseg.data.layout import read_layout
from dpseg.errors import UserError
from dpseg.registry import UnknownNameError

REALSEG = Path(__file__).resolve().parent / "fixtures" / "realseg"  # in the repository: a bare clone tests


def ade_raw(root: Path, copies: int = 3) -> Path:
    """ADEChallengeData2016 layout with `copies` renamed copies of one realseg sample."""
    ade = root / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        (ade / kind / "validation").mkdir(parents=True)
    for i in range(copies):
        stem = f"ADE_val_{i + 1:08d}"
        shutil.copy(
            REALSEG / "ade20k" / "images" / "ADE_val_00000002.jpg", ade / "images" / "validation" / f"{stem}.jpg"
        )
        shutil.copy(
            REALSEG / "ade20k" / "annotations" / "ADE_val_00000002.png",
            ade / "annotations" / "validation" / f"{stem}.png",
        )
    return ade


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_corrupt_image_stops_and_names_the_file(tmp_path):
    ade = ade_raw(tmp_path / "raw")
    bad = ade / "images" / "validation" / "ADE_val_00000002.jpg"
    truncate(bad)
    with pytest.raises(UserError) as err:
        prepare_dataset("ade-150", tmp_path / "raw", tmp_path / "out", progress=False)
    message = str(err.value)
    assert str(bad) in message and "--on-error skip" in message
    assert not (tmp_path / "out" / "dataset.json").exists()  # never looks complete
    # fixing the file and rerunning resumes: the good items are not rewritten
    shutil.copy(REALSEG / "ade20k" / "images" / "ADE_val_00000002.jpg", bad)
    report = prepare_dataset("ade-150", tmp_path / "raw", tmp_path / "out", progress=False)
    assert report.written + report.resumed == 3 and report.written >= 1
    assert len(read_layout(tmp_path / "out").splits["val"]) == 3


def test_skip_records_bad_and_missing_files(tmp_path):
    ade = ade_raw(tmp_path / "raw")
    truncate(ade / "images" / "validation" / "ADE_val_00000001.jpg")
    (ade / "annotations" / "validation" / "ADE_val_00000003.png").unlink()  # image without annotation
    report = prepare_dataset("ade-150", tmp_path / "raw", tmp_path / "out", on_error="skip", progress=False)
    assert report.info.splits["val"] == ["ADE_val_00000002"]
    reasons = {p["id"]: (p["file"], p["reason"]) for p in report.skipped}
    assert set(reasons) == {"ADE_val_00000001", "ADE_val_00000003"}
    assert (
        reasons["ADE_val_00000003"][0].endswith("ADE_val_00000003.png") and "missing" in reasons["ADE_val_00000003"][1]
    )
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert {p["id"] for p in meta["skipped"]["val"]} == set(reasons)


def test_rerun_is_idempotent_and_resumes_missing_items(tmp_path):
    ade_raw(tmp_path / "raw")
    first = prepare_dataset("ade-150", tmp_path / "raw", tmp_path / "out", progress=False)
    label = tmp_path / "out" / "labels" / "val" / "ADE_val_00000002.png"
    before = label.read_bytes()
    again = prepare_dataset("ade-150", tmp_path / "raw", tmp_path / "out", progress=False)
    assert (first.written, again.written, again.resumed) == (3, 0, 3)
    label.unlink()  # as if killed between the image and its label
    resumed = prepare_dataset("ade-150", tmp_path / "raw", tmp_path / "out", progress=False)
    assert (resumed.written, resumed.resumed) == (1, 2) and label.read_bytes() == before
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_refuses_to_mix_outputs(tmp_path):
    ade_raw(tmp_path / "raw")
    prepare_dataset("ade-150", tmp_path / "raw", tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="other settings"):
        prepare_dataset("ade-150", tmp_path / "raw", tmp_path / "out", splits=["train", "val"], progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        prepare_dataset("ade-150", tmp_path / "raw", tmp_path / "busy", progress=False)


@pytest.mark.parametrize(
    "name,src,needle",
    [
        ("ade-150", "missing", "does not exist"),
        ("ade-150", "empty", "ADEChallengeData2016"),
        ("voc-20", "empty", "VOCdevkit/VOC2012"),
        ("pc-59", "empty", "trainval_merged.json"),
        ("pc-459", "empty", "trainval"),
        ("ade-847", "empty", "ADE20K_2021_17_01"),
        ("coco-stuff", "empty", "coco-stuff"),
    ],
)
def test_wrong_src_folder_says_what_is_expected(tmp_path, name, src, needle):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=needle):
        prepare_dataset(name, tmp_path / src, tmp_path / "out", progress=False)


def test_unknown_dataset_and_split():
    with pytest.raises(UnknownNameError, match="ade-150"):
        prepare_dataset("ade-152", ".", "out", progress=False)
    with pytest.raises(UserError, match="no split 'test'"):
        prepare_dataset("ade-150", ".", "out", splits=["test"], progress=False)
    with pytest.raises(UserError, match="--on-error must be one of stop, skip"):
        prepare_dataset("ade-150", ".", "out", on_error="ignore", progress=False)


def voc_raw(root: Path, mask: Image.Image, listed: bool = True) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((mask.height, mask.width, 3), np.uint8)).save(voc / "JPEGImages" / "2007_000033.jpg")
    mask.save(voc / "SegmentationClass" / "2007_000033.png")
    if listed:
        (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    return voc


def test_voc_mask_with_foreign_colour_is_named(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    voc = voc_raw(tmp_path / "raw", Image.fromarray(rgb))
    with pytest.raises(UserError) as err:
        prepare_dataset("voc-20", tmp_path / "raw", tmp_path / "out", progress=False)
    assert "2007_000033.png" in str(err.value) and "(1, 2, 3)" in str(err.value)
    assert voc.exists()


def test_voc_index_mask_out_of_range_and_missing_split_list(tmp_path):
    voc_raw(tmp_path / "a", Image.fromarray(np.full((4, 4), 50, np.uint8)))
    with pytest.raises(UserError, match=r"\[50\]"):
        prepare_dataset("voc-20", tmp_path / "a", tmp_path / "out_a", progress=False)
    voc_raw(tmp_path / "b", Image.fromarray(np.zeros((4, 4), np.uint8)), listed=False)
    with pytest.raises(UserError, match="val.txt"):
        prepare_dataset("voc-20", tmp_path / "b", tmp_path / "out_b", progress=False)


def test_size_mismatch_between_image_and_annotation(tmp_path):
    voc = voc_raw(tmp_path / "raw", Image.fromarray(np.zeros((4, 4), np.uint8)))
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(voc / "JPEGImages" / "2007_000033.jpg")
    with pytest.raises(UserError, match="4x5 but its annotation is 4x4"):
        prepare_dataset("voc-20", tmp_path / "raw", tmp_path / "out", progress=False)


def test_cli_error_is_one_line(tmp_path, cli, one_line_error):
    one_line_error(cli("data", "prepare", "ade-150", "--src", tmp_path / "nowhere", "--out", tmp_path / "o"), "nowhere")
    one_line_error(cli("data", "prepare", "voc-20", "--out", tmp_path / "o"), "--src is required")
