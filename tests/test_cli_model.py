"""`dpseg model summary`, `dpseg bench model` and error reporting through the Typer app."""

import json

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_summary_json_reports_the_paper_facts_for_convnext_b():
    result = runner.invoke(
        app, ["model", "summary", "--encoder", "convnext-b", "--classes", "171", "--size", "768", "--json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["embed_dim"] == 640
    assert info["stage_channels"] == [128, 256, 512, 1024]
    assert info["templates"] == 80
    assert info["cost_volume_shape"] == [1, 80, 171, 24, 24]
    assert info["decoder_dims"] == [64, 32, 16]
    assert info["params_trainable"] > 0 and info["params_frozen"] > 0
    assert info["shapes"]["stage2.out"] == [1, 171, 16, 192, 192]


def test_summary_json_lists_the_aux_heads_and_the_fusion_blocks():
    result = runner.invoke(app, ["model", "summary", "--encoder", "tiny", "--classes", "3", "--size", "64", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert [(h["stage"], h["stride"], h["in_channels"]) for h in info["aux_heads"]] == [
        (0, 32, 128),
        (1, 16, 64),
        (2, 8, 32),
    ]
    assert [(f["stride"], f["out_channels"], f["groupnorm_groups"]) for f in info["fusion_blocks"]] == [
        (16, 64, 4),
        (8, 32, 2),
        (4, 16, 1),
    ]
    plain = runner.invoke(
        app,
        [
            "model",
            "summary",
            "--encoder",
            "tiny",
            "--classes",
            "3",
            "--size",
            "64",
            "--json",
            "--no-deep-supervision",
            "--visual-guidance",
            "none",
        ],
    )
    info = json.loads(plain.stdout)
    assert info["aux_heads"] == [] and [f["guidance_channels"] for f in info["fusion_blocks"]] == [0, 0, 0]


def test_summary_json_for_convnext_l():
    result = runner.invoke(app, ["model", "summary", "--encoder", "convnext-l", "--json"])
    info = json.loads(result.stdout)
    assert info["embed_dim"] == 768 and info["stage_channels"] == [192, 384, 768, 1536]


def test_summary_table_is_readable():
    result = runner.invoke(app, ["model", "summary", "--encoder", "tiny", "--classes", "3", "--size", "64"])
    assert result.exit_code == 0
    assert "cost_volume_shape  [1, 80, 3, 2, 2]" in result.stdout
    assert "stage2.out" in result.stdout


def test_concat_costs_doubles_the_cost_channels():
    result = runner.invoke(
        app,
        [
            "model",
            "summary",
            "--encoder",
            "tiny",
            "--classes",
            "3",
            "--size",
            "64",
            "--fusion",
            "concat-costs",
            "--json",
        ],
    )
    assert json.loads(result.stdout)["cost_volume_shape"] == [1, 160, 3, 2, 2]


def test_unknown_encoder_is_one_error_line_not_a_traceback():
    result = runner.invoke(app, ["model", "summary", "--encoder", "vit-h"])
    assert result.exit_code == 1
    assert "Error: unknown encoder 'vit-h'; known: convnext-b, convnext-l, tiny" in result.output
    assert "Traceback" not in result.output


def test_bad_ablation_is_one_error_line():
    result = runner.invoke(app, ["model", "summary", "--encoder", "tiny", "--prompt-mode", "text"])
    assert result.exit_code == 1
    assert "set visual_guidance 'upsampled-cost'" in result.output


def test_bench_model_writes_json_with_the_decoder_share(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "model",
            "--encoder",
            "tiny",
            "--size",
            "64",
            "--classes",
            "3,6",
            "--batch",
            "1",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--class-chunk",
            "2",
            "--reject-topk",
            "1",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["classes"] for r in data["results"]] == [3, 6]
    for r in data["results"]:
        assert r["model_ms"] > 0 and r["trunk_ms"] > 0 and r["decoder_ms"] > 0
        assert r["decoder_share"] == pytest.approx(1 - r["trunk_ms"] / r["model_ms"], abs=1e-3)
        assert r["chunked_over_unchunked"] == pytest.approx(r["decoder_chunked_ms"] / r["decoder_ms"], abs=1e-3)
        assert r["reject_speedup"] == pytest.approx(r["decoder_ms"] / r["decoder_reject_ms"], abs=1e-3)
    lo, hi = data["results"]
    [scaling] = data["scaling"]
    assert scaling["classes"] == [3, 6] and scaling["class_ratio"] == 2.0
    assert scaling["time_over_linear"] == pytest.approx(hi["decoder_ms"] / lo["decoder_ms"] / 2, abs=1e-3)
    assert data["config"]["encoder"] == "tiny" and data["class_chunk"] == 2 and data["reject_topk"] == 1


def test_demo_without_a_bank_uses_random_visual_prompts():
    result = runner.invoke(app, ["smoke", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert "cost volume [1, 80, 48, 2, 2]" in result.stdout
    assert "prompts: random visual prompts, 48 classes" in result.stdout
    assert "forward: logits [1, 48, 16, 16]" in result.stdout


def test_demo_segments_with_the_prompts_of_a_procedural_bank(tmp_path):
    bank = tmp_path / "bank"
    built = runner.invoke(
        app,
        [
            "bank",
            "build",
            "--generator",
            "procedural",
            "--vocab",
            "shapes",
            "--encoder",
            "tiny",
            "--encoder-weights",
            "none",
            "--templates",
            "2",
            "--resolution",
            "32",
            "--out",
            str(bank),
            "--no-progress",
        ],
    )
    assert built.exit_code == 0, built.output
    result = runner.invoke(app, ["smoke", "--size", "64", "--bank", str(bank)])
    assert result.exit_code == 0, result.output
    assert f"prompts: bank {bank} (procedural, tiny), 48 classes" in result.stdout
    assert "cost volume [1, 2, 48, 2, 2]" in result.stdout  # the bank's 2 templates are the cost channels


def test_demo_with_a_missing_bank_is_one_error_line(tmp_path):
    result = runner.invoke(app, ["smoke", "--bank", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert "Error: no bank at" in result.output and "Traceback" not in result.output


def test_a_multi_line_library_message_still_prints_as_one_line(monkeypatch):
    from dpseg.errors import UserError

    def broken(*args, **kwargs):
        raise UserError("could not load weights (hub says:\n  file not found\n  in cache); pass --weights")

    monkeypatch.setattr("dpseg.model.summary.model_summary", broken)
    result = runner.invoke(app, ["model", "summary", "--encoder", "tiny"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["Error: could not load weights (hub says: file not found in cache); pass --weights"]


def test_bench_train_times_three_cases_and_takes_ratios_from_them(tmp_path):
    out = tmp_path / "train.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "train",
            "--encoder",
            "tiny",
            "--size",
            "32",
            "--classes",
            "2",
            "--templates",
            "1",
            "--batch-size",
            "1",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--num-workers",
            "0",
            "--device",
            "cpu",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    seconds = data["seconds_per_step"]
    assert set(seconds) == {"loader", "memory", "text"} and all(v > 0 for v in seconds.values())
    assert data["ratio_loader_vs_memory"] == pytest.approx(seconds["loader"] / seconds["memory"], abs=1e-3)
    assert data["ratio_dual_vs_text"] == pytest.approx(seconds["memory"] / seconds["text"], abs=1e-3)
    assert (data["encoder"], data["size"], data["classes"], data["templates"]) == ("tiny", 32, 2, 1)
    # each precision the CPU runs, timed on the in-memory step; speed-ups are over fp32
    assert data["mixed_precision"] == "no"  # the three cases run in fp32, SED's precision
    assert list(data["precisions"]) == ["fp32", "bf16"]
    fp32, bf16 = data["precisions"]["fp32"], data["precisions"]["bf16"]
    assert fp32["speedup_vs_fp32"] == 1.0 and bf16["seconds_per_step"] > 0
    assert bf16["speedup_vs_fp32"] == pytest.approx(fp32["seconds_per_step"] / bf16["seconds_per_step"], rel=1e-2)


def test_bench_train_refuses_a_large_encoder_on_the_cpu(tmp_path):
    result = runner.invoke(app, ["bench", "train", "--encoder", "convnext-b", "--device", "cpu"])
    assert result.exit_code == 1
    assert "meant for a GPU: pass --device cuda" in result.output and "Traceback" not in result.output


def test_bench_train_refuses_fp16_on_the_cpu_before_any_work():
    result = runner.invoke(app, ["bench", "train", "--device", "cpu", "--precisions", "fp32,fp16"])
    assert result.exit_code == 1
    assert "--precisions fp16 needs a GPU" in result.output and "Traceback" not in result.output
