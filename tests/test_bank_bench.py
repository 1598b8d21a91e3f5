"""`dpseg bench bank` runs end to end on the CPU (tiny sizes) and reports the four figures."""

from __future__ import annotations

import json

import pytest


def test_bench_bank_writes_the_four_figures(tmp_path, cli):
    out = tmp_path / "bench.json"
    result = cli(
        "bench",
        "bank",
        "--resolution",
        "32",
        "--steps",
        "2",
        "--batch-sizes",
        "2",
        "--batches",
        "2",
        "--rounds",
        "1",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["overhead_ratio"] > 0 and report["overhead"][0]["images"] == 4
    assert report["encode_images_per_s"] > 0 and report["encode"]["images"] == 4
    assert report["prototype_read"]["categories"] == 1000 and report["prototype_read"]["templates"] == 80
    assert 0 < report["prototype_read_s"] < 30
    assert report["dedup"]["distinct_primary_names"] == 1166 and report["dedup_ratio"] == round(1166 / 1706, 4)


def test_bench_bank_encode_only_reports_images_per_second_per_size(tmp_path, cli):
    out = tmp_path / "encode.json"
    args = ["--encode-only", "--encoder", "tiny", "--encode-sizes", "32,64", "--encode-images", "24"]
    args += ["--resolution", "48", "--encode-batch-size", "8", "--encode-workers", "1", "-o", out]
    result = cli("bench", "bank", *args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["encode_size"] for r in report["encode"]] == [32, 64]
    for row in report["encode"]:
        assert row["images"] == 24 and row["workers"] == 1 and row["batch_size"] == 8
        assert row["images_per_s"] == pytest.approx(24 / (row["encode_s"] + row["merge_s"]), rel=1e-2)
