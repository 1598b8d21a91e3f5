"""`dpseg report`: Table 1 / Table 5 forms from stored metrics, panels from saved predictions."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from dpseg.data.shapes import SHAPES_CATEGORIES, UNSEEN_IDS
from pipeline.evaluate.report import render_report


def fake_eval(folder, dataset_name, dataset, bank, generator, miou1, miou2, classes=None, ids=None, names=None):
    ids = ids if ids is not None else [0, 1]
    names = names if names is not None else ["a", "b"]
    passes = {
        p: {"miou": v, "uniform_random_miou": 1.5, "per_class_iou": [v] * len(ids)}
        for p, v in (("1", miou1), ("2", miou2))
    }
    metrics = {
        "format": "dpseg-eval-1",
        "images": 2,
        "class_ids": ids,
        "class_names": names,
        "passes": passes,
        "settings": {
            "dataset_name": dataset_name,
            "dataset": str(dataset),
            "split": "val",
            "classes": classes,
            "bank": str(bank),
            "bank_generator": generator,
            "checkpoint": "ck",
            "encoder": "tiny",
            "passes_run": [1, 2],
            "refinement": {"min_area": 64, "crop": "masked"},
        },
    }
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_tables_put_the_paper_numbers_beside_ours(tmp_path):
    fake_eval(tmp_path / "a150", "ade-150", tmp_path / "nowhere", tmp_path / "bank-sd15", "sd15", 30.25, 31.0)
    fake_eval(tmp_path / "a150-sd3", "ade-150", tmp_path / "nowhere", tmp_path / "bank-sd3", "sd3", 29.0, 29.5)
    fake_eval(
        tmp_path / "unseen",
        "shapes",
        tmp_path / "nowhere",
        tmp_path / "bank-sd15",
        "sd15",
        12.0,
        14.0,
        classes="unseen",
    )
    result = render_report([str(tmp_path / d) for d in ("a150", "unseen")], out=str(tmp_path / "rep"))
    md = result["markdown"]
    assert (tmp_path / "rep" / "report.md").read_text() == md
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| | A-847"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[1:] == ["A-847", "PC-459", "A-150", "PC-59", "PAS-20", "shapes (unseen)"]

    def row(title):
        found = next(line for line in lines if line.startswith(f"| {title} |"))
        return [c.strip() for c in found.strip("|").split("|")]

    assert row("DPSeg pass II (paper)")[1:] == ["12.5", "20.1", "33.3", "58.4", "96.9", "–"]
    assert row("ours pass I")[1:] == ["–", "–", "30.2", "–", "–", "12.0"]
    assert row("ours pass II")[3] == "31.0" and row("ours pass II")[6] == "14.0"
    # Table 5: one row per bank, same column under both
    t5 = render_report(
        [str(tmp_path / "a150"), str(tmp_path / "a150-sd3")], labels=["A-150", "A-150"], out=str(tmp_path / "rep5")
    )["markdown"].splitlines()
    assert any(line.startswith("| sd15 (bank-sd15) |") and "+0.8" in line for line in t5)
    assert any(line.startswith("| sd3 (bank-sd3) |") and "+0.5" in line for line in t5)


def test_panels_from_saved_predictions(tmp_path):
    from dpseg.data.readers import SegmentationDataset
    from dpseg.data.synth import write_shapes_benchmark

    write_shapes_benchmark(tmp_path / "shapes", images=0, val_images=3, size=32, progress=False)
    data = SegmentationDataset(tmp_path / "shapes", "val")
    names = [SHAPES_CATEGORIES[i] for i in UNSEEN_IDS]
    folder = tmp_path / "ev"
    fake_eval(
        folder,
        "shapes",
        tmp_path / "shapes",
        tmp_path / "bank",
        "procedural",
        10.0,
        11.0,
        classes="unseen",
        ids=UNSEEN_IDS,
        names=names,
    )
    for p in ("1", "2"):
        for image_id in data.ids:
            out = folder / "pred" / f"pass{p}" / f"{image_id}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 32), UNSEEN_IDS[0], np.uint8)).save(out)
    result = render_report([str(folder)], labels=["unseen"], out=str(tmp_path / "rep"), panels=2)
    assert [p.split("/")[-1] for p in result["panels"]] == [f"unseen-{i}.png" for i in data.ids[:2]]
    with Image.open(result["panels"][0]) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]  # one row of four tiles
    assert "![unseen-" in result["markdown"]


def test_cli_report_and_its_errors(tmp_path, cli, one_line_error):
    fake_eval(tmp_path / "ev", "pc-59", tmp_path / "nowhere", tmp_path / "bank", "sd15", 50.0, 51.0)
    result = cli("report", tmp_path / "ev", "-o", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    assert "| ours pass II | – | – | – | 51.0 |" in result.stdout
    one_line_error(cli("report", tmp_path / "missing"), "holds no metrics.json")
    one_line_error(cli("report", tmp_path / "ev", "--labels", "a,b"), "2 labels for 1 folders")
