"""`data prepare`: each converter against an independent decoding, on the real realseg
samples (VOC, ADE-150) and on tiny raw layouts built here (COCO-Stuff, PC-59, PC-459, A-847)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from dpseg.data.datasets import prepare_dataset
from dpseg.data.prepare import rle
from dpseg.data.readers import SegmentationDataset
from dpseg.data.vocab import load_vocab

REALSEG = Path(__file__).resolve().parent / "fixtures" / "realseg"  # in the repository: a bare clone tests

# The published VOC colour per class index, written out (not computed like the converter)
VOC_COLOURS = [
    (0, 0, 0),
    (128, 0, 0),
    (0, 128, 0),
    (128, 128, 0),
    (0, 0, 128),
    (128, 0, 128),
    (0, 128, 128),
    (128, 128, 128),
    (64, 0, 0),
    (192, 0, 0),
    (64, 128, 0),
    (192, 128, 0),
    (64, 0, 128),
    (192, 0, 128),
    (64, 128, 128),
    (192, 128, 128),
    (0, 64, 0),
    (128, 64, 0),
    (0, 192, 0),
    (128, 192, 0),
    (0, 64, 128),
]
VOID = (224, 224, 192)


def independent_voc_index(rgb: np.ndarray) -> np.ndarray:
    out = np.full(rgb.shape[:2], -1, dtype=np.int64)
    for index, colour in enumerate(VOC_COLOURS):
        out[(rgb == colour).all(-1)] = index
    out[(rgb == VOID).all(-1)] = 255
    assert (out >= 0).all(), "fixture holds a colour outside the VOC map"
    return out


def voc_train_ids(index: np.ndarray) -> np.ndarray:
    return np.where((index == 0) | (index == 255), 255, index - 1)


def build_voc_raw(root: Path, palette: bool = False) -> dict[str, np.ndarray]:
    """realseg's VOC samples in the official layout; returns id -> expected train ids."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    expected, ids = {}, []
    for image in sorted((REALSEG / "voc2012" / "images").glob("*_image.png")):
        item_id = image.name.split("_")[0]
        ids.append(item_id)
        shutil.copy(image, voc / "JPEGImages" / f"{item_id}.png")
        target = REALSEG / "voc2012" / "targets_rgb" / f"{item_id}_target.png"
        index = independent_voc_index(np.asarray(Image.open(target).convert("RGB")))
        if palette:
            mask = Image.fromarray(index.astype(np.uint8), "P")
            flat = [0] * 768
            for i, colour in [*enumerate(VOC_COLOURS), (255, VOID)]:
                flat[3 * i : 3 * i + 3] = colour
            mask.putpalette(flat)
            mask.save(voc / "SegmentationClass" / f"{item_id}.png")
        else:
            shutil.copy(target, voc / "SegmentationClass" / f"{item_id}.png")
        expected[item_id] = voc_train_ids(index)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return expected


def build_ade_raw(root: Path) -> dict[str, np.ndarray]:
    ade = root / "ADEChallengeData2016"
    expected = {}
    for kind in ("images", "annotations"):
        (ade / kind / "validation").mkdir(parents=True)
    for ann in sorted((REALSEG / "ade20k" / "annotations").glob("*.png")):
        shutil.copy(ann, ade / "annotations" / "validation" / ann.name)
        shutil.copy(
            REALSEG / "ade20k" / "images" / f"{ann.stem}.jpg", ade / "images" / "validation" / f"{ann.stem}.jpg"
        )
        raw = np.asarray(Image.open(ann)).astype(np.int64)
        expected[ann.stem] = np.where(raw == 0, 255, raw - 1)
    return expected


def read_label(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def test_voc_rgb_masks_convert_to_train_ids(tmp_path):
    expected = build_voc_raw(tmp_path / "raw")
    report = prepare_dataset("voc-20", tmp_path / "raw", tmp_path / "out", progress=False)
    assert report.written == len(expected) == 5 and not report.skipped
    names = load_vocab("voc-20")
    present = set()
    for item_id, want in expected.items():
        got = read_label(tmp_path / "out" / "labels" / "val" / f"{item_id}.png")
        np.testing.assert_array_equal(got, want)
        present |= {names[v] for v in np.unique(got) if v != 255}
        # images are copied byte for byte
        src = tmp_path / "raw" / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{item_id}.png"
        assert (tmp_path / "out" / "images" / "val" / f"{item_id}.png").read_bytes() == src.read_bytes()
    assert present == {"aeroplane", "horse", "sheep", "bird", "cow"}  # the realseg README's list


def test_voc_palette_masks_give_the_same_labels(tmp_path):
    expected = build_voc_raw(tmp_path / "raw", palette=True)
    assert Image.open(next((tmp_path / "raw").rglob("SegmentationClass/*.png"))).mode == "P"
    prepare_dataset("voc-20", tmp_path / "raw", tmp_path / "out", progress=False)
    for item_id, want in expected.items():
        np.testing.assert_array_equal(read_label(tmp_path / "out" / "labels" / "val" / f"{item_id}.png"), want)


def test_ade150_shifts_labels_and_ignores_other(tmp_path):
    expected = build_ade_raw(tmp_path / "raw")
    # --src may also point at the dataset folder itself
    prepare_dataset("ade-150", tmp_path / "raw" / "ADEChallengeData2016", tmp_path / "out", progress=False)
    for item_id, want in expected.items():
        got = read_label(tmp_path / "out" / "labels" / "val" / f"{item_id}.png")
        np.testing.assert_array_equal(got, want)
        assert 255 in got and got[got != 255].max() < 150
    dataset = SegmentationDataset(tmp_path / "out", "val")
    assert len(dataset) == 2 and dataset.class_names[0] == "wall"
    sample = dataset[0]
    assert sample["image"].shape[0] == 3 and tuple(sample["image"].shape[1:]) == tuple(sample["label"].shape)


def test_coco_stuff_ids_to_171_contiguous(tmp_path):
    root = tmp_path / "raw" / "coco-stuff"
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "annotations" / "val2017").mkdir(parents=True)
    # stuffthingmaps value = COCO id - 1; the names of those ids in the official label list
    known = {0: "person", 12: "stop sign", 91: "banner", 181: "wood", 11: None, 90: None, 255: None}
    raw = np.array(list(known) * 4, dtype=np.uint8).reshape(4, 7)
    Image.fromarray(raw).save(root / "annotations" / "val2017" / "000000000139.png")
    Image.fromarray(np.zeros((4, 7, 3), np.uint8)).save(root / "images" / "val2017" / "000000000139.jpg")
    prepare_dataset("coco-stuff", tmp_path / "raw", tmp_path / "out", splits=["val"], progress=False)
    got = read_label(tmp_path / "out" / "labels" / "val" / "000000000139.png")
    names = load_vocab("coco-stuff")
    want = np.vectorize(lambda v: 255 if known[v] is None else names.index(known[v]))(raw)
    np.testing.assert_array_equal(got, want)


def test_rle_decoding_matches_hand_encoded_strings():
    assert rle.decode_counts("04") == [0, 4]
    assert rle.decode_counts("d0") == [20]  # 20 = 0b10100: sign bit set, so a second group
    assert rle.decode_counts("1233") == [1, 2, 3, 5]  # the 4th run is stored as 5 - 2
    mask = rle.decode({"size": [2, 2], "counts": "22"})  # column-major: first column 0, second 1
    np.testing.assert_array_equal(mask, [[False, True], [False, True]])


def _list_rle(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(int)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def test_pascal_context_59_from_merged_json(tmp_path):
    voc = tmp_path / "raw" / "VOCdevkit" / "VOC2010"
    (voc / "JPEGImages").mkdir(parents=True)
    h, w = 6, 8
    top, right, bottom = np.zeros((h, w), bool), np.zeros((h, w), bool), np.zeros((h, w), bool)
    top[:3] = True
    right[:, 5:] = True
    bottom[4:, :2] = True
    # category ids are PASCAL Context's 459-label ids (1-based positions in the 459 list);
    # "table" is called "diningtable" in the 59 list; "accordion" is not one of the 59
    pc459 = load_vocab("pc-459")
    aeroplane, table, accordion = (pc459.index(n) + 1 for n in ("aeroplane", "table", "accordion"))
    annos = [
        {"image_id": 7, "category_id": aeroplane, "segmentation": {"size": [h, w], "counts": rle.encode_counts(top)}},
        {"image_id": 7, "category_id": table, "segmentation": {"size": [h, w], "counts": _list_rle(right)}},
        {"image_id": 7, "category_id": accordion, "segmentation": {"size": [h, w], "counts": _list_rle(bottom)}},
        {"image_id": 8, "category_id": aeroplane, "segmentation": {"size": [h, w], "counts": _list_rle(top)}},
    ]
    images = [
        {"image_id": 7, "file_name": "2008_000002.jpg", "height": h, "width": w, "phase": "val"},
        {"image_id": 8, "file_name": "2008_000010.jpg", "height": h, "width": w, "phase": "train"},
    ]
    (voc / "trainval_merged.json").write_text(json.dumps({"images": images, "annos_segmentation": annos}))
    for image in images:
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(voc / "JPEGImages" / image["file_name"])
    report = prepare_dataset("pc-59", tmp_path / "raw", tmp_path / "out", progress=False)
    assert report.info.splits == {"val": ["2008_000002"]}  # only the val phase by default
    got = read_label(tmp_path / "out" / "labels" / "val" / "2008_000002.png")
    pc59 = load_vocab("pc-59")
    want = np.full((h, w), 255)
    want[top] = pc59.index("aeroplane")
    want[right] = pc59.index("diningtable")  # painted later: wins the overlap
    np.testing.assert_array_equal(got, want)


def test_pascal_context_459_from_mat_files(tmp_path):
    voc = tmp_path / "raw" / "VOCdevkit" / "VOC2010"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "trainval").mkdir()
    label_map = np.array([[0, 1, 2], [459, 300, 1]], dtype=np.uint16)
    for stem in ("2008_000002", "2008_000003", "2007_999999"):  # the last is not a val id
        scipy.io.savemat(voc / "trainval" / f"{stem}.mat", {"LabelMap": label_map})
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
    (voc / "pascalcontext_val.txt").write_text("2008_000002\n2008_000003\n")
    report = prepare_dataset("pc-459", tmp_path / "raw", tmp_path / "out", splits=["val", "train"], progress=False)
    assert report.info.splits == {"val": ["2008_000002", "2008_000003"], "train": ["2007_999999"]}
    assert report.info.ignore_index == 65535
    label_path = tmp_path / "out" / "labels" / "val" / "2008_000002.tif"
    assert Image.open(label_path).mode == "I;16"
    got = read_label(label_path)
    np.testing.assert_array_equal(got, [[65535, 0, 1], [458, 299, 0]])
    names = load_vocab("pc-459")
    assert names[0] == "accordion" and names[1] == "aeroplane"  # LabelMap 1 and 2


def _ade_seg_rgb(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # class code = R // 10 * 256 + G; R's last digit is free (ADE uses it for other data)
    rgb = np.zeros((*codes.shape, 3), np.uint8)
    rgb[..., 0] = (codes // 256) * 10 + rng.integers(0, 10, codes.shape)
    rgb[..., 1] = codes % 256
    rgb[..., 2] = rng.integers(0, 256, codes.shape)
    return rgb


def test_ade847_from_per_image_json_and_rgb_codes(tmp_path):
    rng = np.random.default_rng(0)
    scene = tmp_path / "raw" / "ADE20K_2021_17_01" / "images" / "ADE" / "validation" / "home" / "bedroom"
    scene.mkdir(parents=True)
    # ADE20K object-name ids of SED's list: 2978 wall, 312 building, 2420 sky; 0 unlabelled;
    # 5 is an ADE class outside the 847
    ids = {2978: "wall", 312: "building, edifice", 2420: "sky", 0: None, 5: None}
    h, w = 600, 700
    codes = np.zeros((h, w), np.int64)
    for k, code in enumerate(ids):
        codes[:, k * 140 : (k + 1) * 140] = code
    Image.fromarray(_ade_seg_rgb(codes, rng)).save(scene / "ADE_val_00000001_seg.png")
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(scene / "ADE_val_00000001.jpg")
    annotation = {"annotation": {"filename": "ADE_val_00000001.jpg", "imsize": [h, w, 3], "object": []}}
    (scene / "ADE_val_00000001.json").write_text(json.dumps(annotation))
    report = prepare_dataset("ade-847", tmp_path / "raw", tmp_path / "out", progress=False)
    assert report.info.ignore_index == 65535 and report.info.label_dtype == "uint16"
    got = read_label(tmp_path / "out" / "labels" / "val" / "ADE_val_00000001.tif")
    image = Image.open(tmp_path / "out" / "images" / "val" / "ADE_val_00000001.jpg")
    assert got.shape == (512, 597) and image.size == (597, 512)  # short side shrunk to 512
    names = load_vocab("ade-847")
    for k, (code, name) in enumerate(ids.items()):
        column = int((k * 140 + 70) * 597 / 700)  # the middle of each band, rescaled
        assert (got[:, column] == (65535 if name is None else names.index(name))).all(), code


def test_cli_prepare_voc(tmp_path, cli):
    build_voc_raw(tmp_path / "raw")
    result = cli("data", "prepare", "voc-20", "--src", tmp_path / "raw", "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "val 5" in result.output
    assert (tmp_path / "out" / "dataset.json").exists()
