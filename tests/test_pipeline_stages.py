"""Profiles + params resolution, the dvc.yaml wiring, and the bank stages: a noise bank is
derived from the base bank (no regeneration), the base generator's bank is hard-linked."""

import dataclasses
import os
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run

from dpseg.errors import UserError
from pipeline import stages
from pipeline.profiles import PROFILES, eval_set, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_explicit_keys_override_the_profile_and_null_keeps_it():
    r = resolve(
        {"profile": "demo", "train": {"steps": 7, "lr": None, "model_overrides": {}}, "bank": {"generator": None}}
    )
    demo = PROFILES.get("demo")
    assert r["train"]["steps"] == 7
    assert r["train"]["lr"] == demo.defaults("train")["lr"]
    assert r["bank"]["generator"] == "procedural-studio"
    paper = resolve({"profile": "paper-b", "train": {"steps": None}})
    assert paper["train"]["steps"] == 80_000 and paper["bank"]["encoder"] == "convnext-b"
    assert paper["bank"]["generator"] == "sd15" and paper["bank"]["resolution"] == 768
    assert resolve({"profile": "paper-l"})["bank"]["encoder"] == "convnext-l"


def test_bad_params_are_one_line_errors():
    with pytest.raises(UserError, match="unknown profile 'nope'; known: demo, paper-b, paper-l"):
        resolve({"profile": "nope"})
    with pytest.raises(UserError, match="unknown top-level keys"):
        resolve({"profile": "demo", "trian": {}})
    r = resolve({"profile": "demo"})
    with pytest.raises(UserError, match="not defined by profile 'demo' .its sets: seen, unseen"):
        eval_set(r, "ade-150")
    with pytest.raises(UserError, match="noise ratio must be in"):
        stages.noise_ratio("noise:1.5")
    assert stages.noise_ratio("noise:0.2") == 0.2 and stages.noise_ratio("sd15") is None


def test_eval_sets_resolve_to_eval_settings():
    from pipeline.evaluate.loop import EvalSettings

    r = resolve({"profile": "demo", "eval": {"sets": ["seen", "unseen"], "passes": None, "min_area": 9}})
    seen = eval_set(r, "seen")
    assert seen["classes"] == "seen" and seen["out"] == "out/eval/seen" and seen["min_area"] == 9
    EvalSettings(**seen).validate()  # every key is an EvalSettings field
    assert eval_set(r, "unseen")["classes"] == "unseen+background"  # a new dataset labels its canvas


def test_params_yaml_resolves_and_dvc_yaml_tracks_it():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    r = resolve(params)
    assert r["profile"] == "demo"
    from pipeline.train.loop import recipe_from_params

    recipe_from_params(r["train"])  # the demo's train section is a valid recipe
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    # bank-base tracks every bank key but `generator`, so a noise experiment keeps the base bank
    base = {p for p in dvc["bank-base"]["params"] if isinstance(p, str)}
    assert {f"bank.{k}" for k in params["bank"] if k != "generator"} <= base
    assert "bank.generator" not in base and "bank" not in base
    assert dvc["eval"]["foreach"] == "${eval.sets}"
    for name, stage in dvc.items():
        cmd = stage.get("cmd") or stage["do"]["cmd"]
        assert cmd.split()[3] in stages.STAGES, name
        for dep in stage.get("deps") or stage["do"]["deps"]:
            if not dep.startswith(("out/", "metrics/")):
                assert (ROOT / dep).exists(), (name, dep)


def _bank_params(tmp_path: Path) -> dict:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red striped star\nblue dotted circle\n")
    params = {
        "profile": "demo",
        "bank": {"vocab": [str(vocab)], "templates": 2, "encoder_weights": "none", "batch_size": 4, "out": "out/bank"},
    }
    return params


def test_noise_bank_derives_from_the_base_bank(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _bank_params(tmp_path)
    stages.run_bank_base(resolve(params), progress=False)
    base = Path(stages.BASE_BANK)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in base.rglob("*") if p.is_file()}
    tars = sorted(base.glob("images-*.tar"))
    assert tars

    # the base generator: out/bank is the base bank, hard-linked
    stages.run_bank(resolve(params), progress=False)
    assert os.path.samefile(Path("out/bank") / tars[0].name, tars[0])

    # noise:<r>: derived from the base bank's images, which stay as they were
    params["bank"]["generator"] = "noise:0.2"
    stages.run_bank(resolve(params), progress=False)
    from bank.reader import Bank

    derived = Bank("out/bank")
    assert derived.config["derived_from"]["bank"].endswith("bank-base")
    assert derived.config["derived_from"]["ratio"] == 0.2
    assert not os.path.samefile(sorted(Path("out/bank").glob("images-*.tar"))[0], tars[0])
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in base.rglob("*") if p.is_file()}
    assert {p: v for p, v in after.items() if p in before} == before
    protos = derived.prototypes(["red striped star"], "tiny")
    assert tuple(protos.embedding.shape[:2]) == (1, 2)


def test_bank_stage_without_a_base_bank_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run `dvc repro bank-base` first"):
        stages.run_bank(resolve(_bank_params(tmp_path)), progress=False)


def test_compact_metrics_and_results_table(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    full = {
        "images": 3,
        "class_ids": [0, 1],
        "passes": {
            "1": {
                "miou": 40.0,
                "fwiou": 41.0,
                "pacc": 50.0,
                "macc": 45.0,
                "uniform_random_miou": 2.5,
                "per_class_iou": [1],
            },
            "2": {"miou": 42.5, "fwiou": 43.0, "pacc": 52.0, "macc": 47.0, "uniform_random_miou": 2.5},
        },
        "pass2_minus_pass1_miou": 2.5,
    }
    compact = stages.compact_metrics(full)
    assert compact["pass1"] == {"miou": 40.0, "fwiou": 41.0, "pacc": 50.0, "macc": 45.0, "uniform_random_miou": 2.5}
    assert compact["pass2_minus_pass1_miou"] == 2.5
    Path("metrics/eval").mkdir(parents=True)
    Path("out/eval/seen").mkdir(parents=True)
    Path("metrics/eval/seen.json").write_text(json.dumps(compact))
    Path("out/eval/seen/metrics.json").write_text(json.dumps(full))
    table = stages.results_table(resolve({"profile": "demo", "eval": {"sets": ["seen", "unseen"]}}))
    assert "| seen | 2 | 3 | 40.0 | 42.5 | 2.5 | 2.5 | – |" in table
    assert "| unseen | – |" in table


def test_a_text_only_checkpoint_is_evaluated_in_one_pass(tmp_path):
    """The profile asks for two passes; pass II replaces visual prompts, which a text-only model
    (the Table 2 'text' row) does not have, so the eval stage runs pass I alone for it."""
    import torch

    from dpseg.model import DPSegConfig, build_dpseg
    from dpseg.model.checkpoint import save_dpseg
    from pipeline.stages import checkpoint_uses_visual

    for mode, guidance, expected in (("text", "none", False), ("dual", "prompt", True), ("visual", "prompt", True)):
        torch.manual_seed(0)
        model = build_dpseg(
            DPSegConfig(encoder="tiny", templates=2, prompt_mode=mode, visual_guidance=guidance), weights=None
        )
        save_dpseg(model, tmp_path / mode)
        assert checkpoint_uses_visual(str(tmp_path / mode)) is expected


def test_the_eval_stage_runs_a_text_only_checkpoint_in_one_pass_without_the_oracle(tmp_path, monkeypatch):
    """The demo profile asks for two passes and the oracle diagnostic (ground-truth crops in pass
    II); the Table 2 'text' row's checkpoint gets pass I alone, so its eval runs instead of failing."""
    import pipeline.evaluate.loop

    ran = []
    monkeypatch.setattr(stages, "checkpoint_uses_visual", lambda checkpoint: False)
    monkeypatch.setattr(pipeline.evaluate.loop, "eval_from_params", lambda s, progress: ran.append(dict(s)) or {})
    settings = {"checkpoint": "ckpt", "out": str(tmp_path / "eval"), "device": "cpu", "passes": 2, "oracle": True}
    stages._evaluate(settings, progress=False)
    assert (ran[0]["passes"], ran[0]["oracle"]) == (1, False)
    monkeypatch.setattr(stages, "checkpoint_uses_visual", lambda checkpoint: True)
    stages._evaluate({**settings, "passes": 2, "oracle": True}, progress=False)
    assert (ran[1]["passes"], ran[1]["oracle"]) == (2, True)


@pytest.mark.parametrize("profile", ["demo", "paper-b"])
def test_printed_params_are_the_values_every_stage_runs_with(profile, tmp_path, monkeypatch):
    """`python -m pipeline.stages params` shows, per section, exactly the settings object each
    stage hands to its stage function (captured here in place of the real work)."""
    from dataclasses import asdict

    import pipeline.bank_stage
    import pipeline.clip.pretrain
    import pipeline.evaluate.loop
    import pipeline.train.loop
    from pipeline.bank_stage import settings_view

    monkeypatch.chdir(tmp_path)
    seen: dict[str, list] = {"bank": [], "train": [], "eval": [], "clip": []}
    monkeypatch.setattr(pipeline.bank_stage, "build_bank", lambda opts: seen["bank"].append(opts) or {})
    monkeypatch.setattr(pipeline.train.loop, "train", lambda recipe, progress: seen["train"].append(recipe) or {})
    monkeypatch.setattr(pipeline.evaluate.loop, "evaluate", lambda s, progress: seen["eval"].append(s) or {})
    monkeypatch.setattr(pipeline.clip.pretrain, "pretrain", lambda cfg, progress: seen["clip"].append(cfg) or {})
    monkeypatch.setattr(stages, "checkpoint_uses_visual", lambda checkpoint: True)
    r = resolve({"profile": profile})
    printed = yaml.safe_load(yaml.safe_dump(stages.stage_params(r)))  # as the command prints it

    stages.run_clip(r, progress=False)
    stages.run_bank_base(r, progress=False)
    stages.run_train(r, progress=False)
    for name in r["eval"]["sets"]:
        stages.run_eval(r, name, progress=False)

    bank = settings_view(seen["bank"][0])  # the base bank, which the `bank` stage links as bank.out
    assert bank["out"] == stages.BASE_BANK
    assert printed["bank"] == {**bank, "out": r["bank"]["out"], "base_generator": r["bank"]["generator"]}
    assert printed["train"] == asdict(seen["train"][0])
    assert [printed["eval"][name] for name in r["eval"]["sets"]] == [asdict(s) for s in seen["eval"]]
    if printed["clip"]["enabled"]:
        assert {k: v for k, v in printed["clip"].items() if k != "enabled"} == asdict(seen["clip"][0])
    else:
        assert seen["clip"] == []
    expected_templates = {"demo": 80, "paper-b": 80}[profile]
    assert printed["bank"]["templates"] == expected_templates and printed["train"]["steps"] > 0


def test_params_command_prints_yaml_and_params_yaml_says_so(tmp_path, monkeypatch, capsys):
    assert "python -m pipeline.stages params" in (ROOT / "params.yaml").read_text().splitlines()[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("profile: demo\ntrain:\n  steps: 7\n")
    stages.main(["params", "params.yaml"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["profile"] == "demo" and shown["train"]["steps"] == 7 and shown["train"]["lr"] == 2e-3
    assert shown["bank"]["generator"] == "procedural-studio" and shown["eval"]["seen"]["passes"] == 2


def test_the_demo_eval_saves_a_few_predictions_and_the_report_draws_their_panels(tmp_path, monkeypatch):
    """The demo profile's eval keeps the first images' predictions and its report turns them into
    image | ground truth | pass I | pass II panels (a tiny random checkpoint stands in)."""
    from PIL import Image

    from dpseg.data.shapes import UNSEEN
    from dpseg.data.synth import write_shapes_benchmark

    monkeypatch.chdir(tmp_path)
    write_shapes_benchmark(Path("out/data/shapes"), images=1, val_images=6, size=64, progress=False)
    tiny_run(Path("."), list(UNSEEN), "out/bank", "out/train/checkpoint", recipe={"crop_size": 64})
    r = resolve({"profile": "demo", "eval": {"sets": ["unseen"]}})
    assert r["eval"]["save_predictions"] == 4 and r["report"]["panels"] == 4
    stages.run_eval(r, "unseen", progress=False)
    for p in (1, 2):
        saved = sorted(Path(f"out/eval/unseen/pred/pass{p}").iterdir())
        assert len(saved) == 4  # the first 4 of the 6 val images
    result = stages.run_report(r, progress=False)
    panels = sorted(Path("out/report/panels").glob("*.png"))
    assert len(panels) == 4
    with Image.open(panels[0]) as im:
        assert im.size[0] > 2.5 * im.size[1]  # four tiles side by side (three would be ~2.1 wide)
    report = Path(result["report"]).read_text()
    assert "## Panels (image | ground truth | pass I | pass II)" in report
    assert all(f"(panels/{p.name})" in report for p in panels)


def test_save_predictions_takes_a_count():
    from pipeline.evaluate.loop import EvalSettings, saves

    assert [saves(2, i) for i in range(4)] == [True, True, False, False]
    assert saves(True, 10_000) and not saves(False, 0) and not saves(0, 0)
    with pytest.raises(UserError, match="save_predictions must be"):
        EvalSettings(checkpoint="c", dataset="d", save_predictions=-1).validate()


def test_results_table_shows_the_interval_and_the_oracle_diagnostic(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    full = {
        "images": 500,
        "class_ids": [0, 1],
        "passes": {"1": {"miou": 40.0, "uniform_random_miou": 2.5}, "2": {"miou": 42.5, "uniform_random_miou": 2.5}},
        "pass2_minus_pass1_miou": 2.5,
        "paired_bootstrap": {"estimate": 2.5, "ci95": [1.0, 4.0]},
        "diagnostics": {"pass2_oracle": {"miou": 50.0}, "share_of_oracle_gain_closed": 0.25},
    }
    compact = stages.compact_metrics(full)
    assert compact["pass2_minus_pass1_ci95"] == [1.0, 4.0] and compact["diagnostic_pass2_oracle_miou"] == 50.0
    assert compact["pass2"]["miou"] == 42.5
    Path("metrics/eval").mkdir(parents=True)
    Path("out/eval/seen").mkdir(parents=True)
    Path("metrics/eval/seen.json").write_text(json.dumps(compact))
    Path("out/eval/seen/metrics.json").write_text(json.dumps(full))
    table = stages.results_table(resolve({"profile": "demo", "eval": {"sets": ["seen"]}}))
    assert "| seen | 2 | 500 | 40.0 | 42.5 | +2.5 [+1.0, +4.0] | 2.5 | 50.0, 25% |" in table
    assert "diagnostic" in table.splitlines()[0]


def test_the_seed_spread_trains_the_recipe_at_each_extra_seed_and_evaluates_every_set(tmp_path, monkeypatch):
    """The `seeds` stage: the train section at each of seeds.extra into its own folder, then each
    eval set on that checkpoint as the eval stage runs it; the results table gains a row per
    (seed, set), the train stage's seed first (training and evaluation captured here)."""
    import json

    import pipeline.evaluate.loop
    import pipeline.train.loop

    monkeypatch.chdir(tmp_path)
    trained, evaluated = [], []
    monkeypatch.setattr(pipeline.train.loop, "train", lambda recipe, progress: trained.append(recipe) or {})

    def fake_evaluate(settings, progress):
        evaluated.append(settings)
        seed = int(Path(settings.checkpoint).parts[2].removeprefix("seed-"))
        miou = 10.0 * seed + (1 if settings.classes == "seen" else 2)
        return {"images": 5, "passes": {"1": {"miou": miou}, "2": {"miou": miou + 0.5}}, "pass2_minus_pass1_miou": 0.5}

    monkeypatch.setattr(pipeline.evaluate.loop, "evaluate", fake_evaluate)
    monkeypatch.setattr(stages, "checkpoint_uses_visual", lambda checkpoint: True)
    r = resolve({"profile": "demo", "seeds": {"extra": [3, 1]}})
    stages.run_seeds(r, progress=False)

    assert [(t.seed, t.out) for t in trained] == [(3, "out/seeds/seed-3/train"), (1, "out/seeds/seed-1/train")]
    main = pipeline.train.loop.recipe_from_params(r["train"])
    assert all(dataclasses.replace(t, seed=main.seed, out=main.out) == main for t in trained)  # nothing else differs
    assert [(e.checkpoint, e.out, e.classes) for e in evaluated] == [
        (f"out/seeds/seed-{s}/train/checkpoint", f"out/seeds/seed-{s}/eval/{c}", eval_set(r, c)["classes"])
        for s in (3, 1)
        for c in ("seen", "unseen")
    ]
    assert all(e.save_predictions == 0 and e.oracle == r["eval"]["oracle"] for e in evaluated)
    written = json.loads(Path("metrics/seeds.json").read_text())["seeds"]
    assert list(written) == ["3", "1"] and written["1"]["unseen"]["pass1"]["miou"] == 12.0

    # the main seed's row comes from the eval stage's metrics
    Path("metrics/eval").mkdir()
    Path("metrics/eval/seen.json").write_text(json.dumps({"pass1": {"miou": 7.0}, "pass2": {"miou": 8.0}}))
    table = stages.results_table(r)
    assert "| 0 | seen | 7.0 | 8.0 |" in table and "| 0 | unseen | – | – | – | – |" in table
    assert "| 3 | seen | 31.0 | 31.5 | 0.5 | – |" in table and "| 1 | unseen | 12.0 | 12.5 | 0.5 | – |" in table


@pytest.mark.parametrize("extra", [[0], [1, 1], ["1"], 1, [-2]])
def test_extra_seeds_are_distinct_whole_numbers_other_than_the_train_seed(extra):
    r = resolve({"profile": "demo", "seeds": {"extra": extra}})
    with pytest.raises(UserError, match=r"seeds.extra: a list of distinct whole numbers other than train.seed \(0\)"):
        stages.extra_seeds(r)


def test_no_extra_seeds_write_an_empty_spread_and_no_second_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = resolve({"profile": "paper-b"})
    assert stages.extra_seeds(r) == [] and stages.run_seeds(r, progress=False) == {}
    assert Path("out/seeds").is_dir() and Path("metrics/seeds.json").read_text().strip() == '{\n  "seeds": {}\n}'
    assert "Per training seed" not in stages.results_table(r)
