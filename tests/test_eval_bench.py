"""`dpseg bench eval` runs and reports what the benchmark page quotes (values are not asserted: no
timed tests)."""

from __future__ import annotations

import json


def test_bench_eval_reports_ratio_and_scaling_cases(tmp_path, cli):
    out = tmp_path / "eval.json"
    result = cli(
        "bench",
        "eval",
        "--size",
        "32",
        "--templates",
        "2",
        "--batch",
        "1",
        "--classes",
        "3",
        "--class-chunk",
        "2",
        "--ratio-classes",
        "3",
        "--repeats",
        "1",
        "--topk",
        "2",
        "--no-isolate",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["bench"] == "eval" and data["templates"] == 2 and data["size"] == 32
    assert [(c["classes"], c["class_chunk"]) for c in data["scaling"]] == [(3, None), (3, 2)]
    case = data["ratio_case"]
    assert abs(data["two_pass_over_one_pass"] - case["two_pass_ms"] / case["one_pass_ms"]) < 0.01  # ms are rounded
    assert all(c["refined_classes_per_image"] == min(8, c["classes"]) for c in data["scaling"])
    modes = data["two_pass_over_one_pass_by_mode"]
    assert list(modes) == ["exact", "topk", "topk+fit"] and modes["exact"] == data["two_pass_over_one_pass"]
    assert [(c["topk"], c["fit"]) for c in data["ratio_cases"].values()] == [(0, False), (2, False), (2, True)]


def test_the_bench_detection_map_has_the_asked_classes():
    from pipeline.bench.eval import _detect_map

    m = _detect_map(2, 32, 8, "cpu")
    assert m.shape == (2, 32, 32) and sorted(m.unique().tolist()) == list(range(8))
