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
        "2,1",
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
    assert list(modes) == ["exact", "topk2", "topk2+fit", "topk1", "topk1+fit"]
    assert modes["exact"] == data["two_pass_over_one_pass"] and data["topk"] == [2, 1]
    cases = [(c["topk"], c["fit"]) for c in data["ratio_cases"].values()]
    assert cases == [(0, False), (2, False), (2, True), (1, False), (1, True)]


def test_bench_eval_refuses_a_k_that_is_not_a_positive_integer(tmp_path, cli):
    result = cli("bench", "eval", "--topk", "16,x", "--no-isolate")
    assert result.exit_code != 0 and "--topk takes comma-separated positive integers, got '16,x'" in result.output


def test_the_bench_detection_map_has_the_asked_classes():
    from pipeline.bench.eval import _detect_map

    m = _detect_map(2, 32, 8, "cpu")
    assert m.shape == (2, 32, 32) and sorted(m.unique().tolist()) == list(range(8))


def test_bench_eval_times_the_demo_decoder_with_crop_channels(tmp_path, cli):
    from pipeline.bench import eval as bench

    out = tmp_path / "eval.json"
    args = ["--size", "32", "--templates", "2", "--batch", "1", "--classes", "", "--ratio-classes", "3"]
    result = cli("bench", "eval", *args, "--repeats", "1", "--topk", "1", "--crop-channels", "--no-isolate", "-o", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["crop_channels"] is True and list(data["two_pass_over_one_pass_by_mode"]) == [
        "exact",
        "topk1",
        "topk1+fit",
    ]
    (model,) = bench._MODELS.values()  # the network the cases were timed on
    assert model.cfg.crop_channels and model.decoder.cost_embed.in_channels == 4
