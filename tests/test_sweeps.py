"""Ablation sweeps: each sweep's parameter sets, `dvc exp show` parsing, resume planning on fake
experiment records, the dvc commands a sweep issues (never run), and the Markdown table."""

from __future__ import annotations

import pytest
import yaml

from dpseg.errors import UserError
from pipeline.analyze import sweeps
from pipeline.analyze.sweeps import SWEEPS

PARAMS = """\
profile: demo
bank:
  generator: procedural
  templates: 4
  vocab: [shapes]
train:
  prompt_mode: dual
  fusion: avg-embeddings
  visual_guidance: prompt
  templates: 4
  model_overrides: {}
"""


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    return path


def sets(name, profile="demo"):
    return [p.params for p in SWEEPS.get(name).expand(profile)]


def test_each_sweep_expands_to_the_paper_tables_parameter_sets():
    mode, fusion, guide = "train.prompt_mode", "train.fusion", "train.visual_guidance"
    assert sets("prompts") == [
        {mode: "text", fusion: "avg-embeddings", guide: "none"},
        {mode: "visual", fusion: "avg-embeddings", guide: "prompt"},
        {mode: "dual", fusion: "avg-embeddings", guide: "prompt"},
        {mode: "dual", fusion: "concat-costs", guide: "prompt"},
        {mode: "dual", fusion: "avg-costs", guide: "prompt"},
    ]
    dual = {mode: "dual", fusion: "avg-embeddings"}
    stages = "train.model_overrides.guidance_stages"
    assert sets("guidance") == [
        {**dual, guide: "none"},
        {**dual, guide: "prompt", stages: [True, False, False]},
        {**dual, guide: "prompt", stages: [True, True, False]},
        {**dual, guide: "prompt"},
        {**dual, guide: "upsampled-cost"},
    ]
    assert sets("templates") == [{"bank.templates": 80, "train.templates": k} for k in (1, 10, 20, 40, 80)]
    noise = [{"bank.generator": f"noise:{r}"} for r in (0.2, 0.6, 0.8)]
    assert sets("banks", "demo") == [{}, *noise]
    assert sets("banks", "paper") == [{}, *noise, {"bank.generator": "sd3"}, {"bank.generator": "layerdiffuse"}]
    assert [p.label for p in SWEEPS.get("banks").skipped("demo")] == ["sd3", "layerdiffuse"]
    assert SWEEPS.names() == ["banks", "guidance", "prompts", "templates"]


def test_every_model_setting_a_sweep_asks_for_is_a_valid_model_config():
    from dpseg.model.config import DPSegConfig

    for name in ("prompts", "guidance", "templates"):
        for params in sets(name):
            model = {k.split(".")[-1]: v for k, v in params.items() if k.startswith("train.")}
            DPSegConfig(encoder="tiny", **model)  # raises on a combination the model refuses


def test_set_args_and_names():
    point = SWEEPS.get("templates").points[1]
    assert sweeps.set_args(point) == ["-S", "bank.templates=80", "-S", "train.templates=10"]
    noisy = SWEEPS.get("banks").points[1]
    assert sweeps.set_args(noisy) == ["-S", "bank.generator=noise:0.2"]
    assert sweeps.format_value([1, 2]) == "[1, 2]" and sweeps.format_value(None) == "null"
    assert sweeps.format_value(True) == "true" and sweeps.format_value(0.5) == "0.5"
    base = sweeps.flatten({"bank": {"templates": 4}, "train": {"templates": 4}})
    a = sweeps.experiment_name("templates", point, sweeps.expected_params(base, point))
    b = sweeps.experiment_name("templates", point, sweeps.expected_params({**base, "x": 1}, point))
    assert a.startswith("templates-10-templates-") and a != b  # another baseline, another name
    assert all(c.isalnum() or c == "-" for c in a)


# ---- fake `dvc exp show --json` --------------------------------------------------------------
def state(rev, params, metrics=None, name=None, error=None):
    data = {
        "rev": rev,
        "timestamp": None,
        "params": {"params.yaml": {"data": params}},
        "metrics": {f: {"data": d} for f, d in (metrics or {}).items()},
        "deps": {},
        "outs": {},
        "meta": {},
    }
    return {"rev": rev, "name": name, "data": data, "error": error, "experiments": None}


def exp(name, params, metrics=None, executor="success", error=None):
    return {
        "revs": [state(f"rev-{name}", params, metrics, name, error)],
        "executor": {"state": executor, "name": None, "local": None},
        "name": name,
    }


def tree(**train):
    return {
        "profile": "demo",
        "bank": {"generator": "procedural", "templates": 4, "vocab": ["shapes"]},
        "train": {
            "prompt_mode": "dual",
            "fusion": "avg-embeddings",
            "visual_guidance": "prompt",
            "templates": 4,
            "model_overrides": {},
            **train,
        },
    }


def metrics(seen, unseen):
    return {
        "out/eval/seen/metrics.json": {"passes": {"1": {"miou": seen, "pacc": 90.0}}, "uniform_random_miou": 1.0},
        "out/eval/unseen/metrics.json": {"passes": {"1": {"miou": unseen, "pacc": 80.0}}},
    }


def fake_show():
    """Baseline commit (params.yaml defaults = the dual row, with results), one finished text
    experiment, a queued visual one, a failed concat one, an avg-costs one run under another
    baseline (templates 8), and a workspace row whose metrics must not count."""
    baseline = state("abc1234", tree(), metrics(50.0, 20.0), name="main")
    baseline["experiments"] = [
        exp("t", tree(prompt_mode="text", visual_guidance="none"), metrics(40.0, 10.0)),
        exp("v", tree(prompt_mode="visual"), None, executor="queued"),
        exp(
            "prompts-dual-concat-costs-000000",
            tree(fusion="concat-costs"),
            None,
            executor="failed",
            error={"msg": "boom", "type": "ReproductionError"},
        ),
        exp("old", tree(fusion="avg-costs", templates=8), metrics(45.0, 15.0)),
    ]
    workspace = state("workspace", tree(fusion="avg-costs"), metrics(99.0, 99.0))
    return [workspace, baseline]


def test_exp_show_records_are_parsed():
    records = sweeps.parse_exp_show(fake_show())
    assert [(r.name, r.state) for r in records] == [
        ("main", "baseline"),
        ("t", "success"),
        ("v", "queued"),
        ("prompts-dual-concat-costs-000000", "failed"),
        ("old", "success"),
    ]
    base, text = records[0], records[1]
    assert base.params["train.fusion"] == "avg-embeddings" and base.params["bank.vocab"] == ["shapes"]
    assert text.metrics["out/eval/unseen/metrics.json:passes.1.miou"] == 10.0
    assert [r.has_results for r in records] == [True, True, False, False, True]


def test_plan_resumes_only_what_has_no_results(params_file):
    base = sweeps.flat_params(params_file)
    records = sweeps.parse_exp_show(fake_show())
    plan = sweeps.plan_sweep(SWEEPS.get("prompts"), base, records, "demo")
    assert [(p.point.label, p.status) for p in plan] == [
        ("text", "done"),
        ("visual", "pending"),
        ("dual", "done"),
        ("dual, concat costs", "todo"),
        ("dual, average costs", "todo"),
    ]  # 'old' ran with templates 8; the workspace row never counts
    assert plan[0].record.name == "t" and plan[2].record.name == "main"
    # values compare by meaning: '4' in a record is the 4 of params.yaml
    expected = sweeps.expected_params(base, plan[3].point)
    spelled = {k: v if isinstance(v, (list, dict)) else str(v) for k, v in expected.items()}
    stringly = sweeps.ExpRecord("r", "s", spelled, {"m.json:miou": 1.0}, "success")
    assert stringly.params["train.templates"] == "4"
    assert sweeps.plan_sweep(SWEEPS.get("prompts"), base, [stringly], "demo")[3].status == "done"


def test_run_issues_dvc_commands_for_missing_points_only(params_file):
    calls = []

    def runner(args):
        calls.append(args)
        return type("Result", (), {"returncode": 0})()

    records = sweeps.parse_exp_show(fake_show())
    report = sweeps.run_sweep(
        "prompts", params_file, runner=runner, records_reader=lambda: records, dvc="dvc", echo=lambda _: None
    )
    assert [c[:4] for c in calls] == [["dvc", "exp", "run", "--name"]] * 2
    concat, costs = calls
    assert concat[5] == "--temp" and concat[-6:] == [
        "-S",
        "train.prompt_mode=dual",
        "-S",
        "train.fusion=concat-costs",
        "-S",
        "train.visual_guidance=prompt",
    ]
    assert costs[-4:-2] == ["-S", "train.fusion=avg-costs"]
    assert [p["status"] for p in report["points"]] == ["done", "pending", "done", "ran", "ran"]
    # queue mode: queued, then workers started; queue-only: no workers
    calls.clear()
    sweeps.run_sweep(
        "prompts",
        params_file,
        queue=True,
        jobs=2,
        runner=runner,
        records_reader=lambda: records,
        dvc="dvc",
        echo=lambda _: None,
    )
    assert [c[5] for c in calls[:2]] == ["--queue", "--queue"] and calls[2] == ["dvc", "queue", "start", "--jobs", "2"]
    calls.clear()
    sweeps.run_sweep(
        "prompts",
        params_file,
        queue_only=True,
        runner=runner,
        records_reader=lambda: records,
        dvc="dvc",
        echo=lambda _: None,
    )
    assert len(calls) == 2 and all("--queue" in c for c in calls)


def test_a_failing_experiment_stops_a_sequential_sweep_and_reruns_reuse_its_name(params_file):
    calls = []

    def failing(args):
        calls.append(args)
        return type("Result", (), {"returncode": 1})()

    report = sweeps.run_sweep(
        "templates", params_file, runner=failing, records_reader=lambda: [], dvc="dvc", echo=lambda _: None
    )
    assert len(calls) == 1 and report["failed"] == ["1 template"]
    name = calls[0][4]
    base = sweeps.flat_params(params_file)
    failed = sweeps.ExpRecord("rev", name, {}, {}, "failed")  # a failed run leaves no ref: same name, no force
    plan = sweeps.plan_sweep(SWEEPS.get("templates"), base, [failed], "demo")
    assert plan[0].status == "todo" and "--force" not in sweeps.exp_run_args(plan[0], queue=False, dvc="dvc")
    empty = sweeps.ExpRecord("rev", name, {}, {}, "success")  # finished without metrics: its ref holds the name
    plan = sweeps.plan_sweep(SWEEPS.get("templates"), base, [empty], "demo")
    assert plan[0].rerun_name and "--force" in sweeps.exp_run_args(plan[0], queue=False, dvc="dvc")
    assert not plan[1].rerun_name


def test_a_model_override_replaces_the_empty_mapping_it_goes_under(params_file):
    base = sweeps.flat_params(params_file)
    assert base["train.model_overrides"] == {}
    point = SWEEPS.get("guidance").points[1]
    expected = sweeps.expected_params(base, point)
    assert "train.model_overrides" not in expected
    assert expected["train.model_overrides.guidance_stages"] == [True, False, False]
    assert sweeps.set_args(point)[-1] == "train.model_overrides.guidance_stages=[true, false, false]"
    # DVC (Hydra) appends a key params.yaml lacks only when told: +key=value
    planned = sweeps.plan_sweep(SWEEPS.get("guidance"), base, [], "demo")[1]
    assert planned.new_keys == ("train.model_overrides.guidance_stages",)
    args = sweeps.exp_run_args(planned, queue=True, dvc="dvc")
    assert args[-2:] == ["-S", "+train.model_overrides.guidance_stages=[true, false, false]"]
    assert args[-4:-2] == ["-S", "train.visual_guidance=prompt"]
    # as DVC records that experiment: the nested key, no empty mapping
    ran = tree(model_overrides={"guidance_stages": [True, False, False]})
    record = sweeps.parse_exp_show([{**state("abc", tree()), "experiments": [exp("s1", ran, metrics(1.0, 2.0))]}])[1]
    plan = sweeps.plan_sweep(SWEEPS.get("guidance"), base, [record], "demo")
    assert [p.status for p in plan] == ["todo", "done", "todo", "todo", "todo"]


def test_missing_params_keys_are_one_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text("bank:\n  generator: procedural\n")
    with pytest.raises(UserError, match="params.yaml has no .*train.fusion"):
        sweeps.run_sweep(
            "prompts", tmp_path / "params.yaml", runner=None, records_reader=lambda: [], echo=lambda _: None
        )
    (tmp_path / "params.yaml").write_text("train:\n  prompt_mode: dual\n  fusion: x\n  visual_guidance: none\n")
    with pytest.raises(UserError, match="guidance_stages"):  # no model_overrides mapping to put it under
        sweeps.run_sweep(
            "guidance", tmp_path / "params.yaml", runner=None, records_reader=lambda: [], echo=lambda _: None
        )
    with pytest.raises(UserError, match="no .*params.yaml here"):
        sweeps.flat_params(tmp_path / "nowhere" / "params.yaml")


def test_table_shows_each_row_with_its_experiments_metrics(params_file):
    records = sweeps.parse_exp_show(fake_show())
    table = sweeps.sweep_table("prompts", params_file, records=records)
    lines = table.splitlines()
    assert lines[0].startswith("**Table 2:")
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["", "setting", "seen", "unseen", "experiment"]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in lines[4:9]}
    assert rows["a: prompts text"][2:] == ["40.0", "10.0", "t"]
    assert rows["a: prompts dual"][2:] == ["50.0", "20.0", "main"]
    assert rows["a: prompts visual"][2:] == ["—", "—", "pending"]
    assert rows["b: fusion dual, concat costs"][2:] == ["—", "—", "todo"]
    assert "99.0" not in table  # the workspace's stale metrics


def test_a_table_with_no_finished_point_renders_every_row_as_todo(params_file):
    table = sweeps.sweep_table("templates", params_file, records=[])
    lines = table.splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["", "setting", "experiment"]
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in lines[4:9]]
    assert [r[0] for r in rows] == ["1 template", "10 templates", "20 templates", "40 templates", "80 templates"]
    assert all(r[-1] == "todo" for r in rows)


def test_short_headers_drop_shared_words():
    cols = [
        "out/eval/seen/metrics.json:passes.1.miou",
        "out/eval/seen/metrics.json:passes.2.miou",
        "out/eval/unseen/metrics.json:passes.1.miou",
    ]
    assert sweeps.short_headers(cols) == ["seen pass1", "seen pass2", "unseen pass1"]
    assert sweeps.short_headers(["m.json:miou"]) == ["miou"]
    # the pipeline's compact metrics files (metrics/eval/<set>.json: pass1.miou, ...)
    record = sweeps.ExpRecord(
        "r",
        "x",
        {},
        {
            "metrics/eval/seen.json:pass1.miou": 1.0,
            "metrics/eval/seen.json:pass1.uniform_random_miou": 2.0,
            "metrics/eval/seen.json:pass2_minus_pass1_miou": 0.1,
            "metrics/eval/unseen.json:pass2.miou": 3.0,
            "out/clip/metrics.json:zero_shot_accuracy": 0.2,
        },
        "success",
    )
    columns = sweeps.metric_columns([record])
    assert columns == ["metrics/eval/seen.json:pass1.miou", "metrics/eval/unseen.json:pass2.miou"]
    assert sweeps.short_headers(columns) == ["seen pass1", "unseen pass2"]


def test_cli_lists_sweeps_and_refuses_bad_input(cli, one_line_error, params_file, monkeypatch):
    listed = cli("analyze", "sweep")
    assert listed.exit_code == 0 and "Table 4" in listed.stdout and "templates" in listed.stdout
    one_line_error(cli("analyze", "sweep", "nope", "--params", params_file), "unknown sweep 'nope'")
    one_line_error(cli("analyze", "sweep", "prompts", "--queue", "--queue-only"), "exclude each other")
    monkeypatch.chdir(params_file.parent)  # not a git/DVC repository: `dvc exp show` fails, in one line
    one_line_error(cli("analyze", "sweep", "templates", "--dry-run"), "dvc exp show", "git+DVC repo")


def test_nulls_resolved_by_the_profile_match_explicit_values(tmp_path):
    """params.yaml leaves most keys null (the profile's value): the baseline commit of such a file
    is the dual / all-stages row, though it never spells 'dual'."""
    nulls = {
        "profile": "demo",
        "bank": {"generator": None, "templates": None},
        "train": {
            "prompt_mode": None,
            "fusion": None,
            "visual_guidance": None,
            "templates": None,
            "model_overrides": {},
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(nulls))
    base = sweeps.flat_params(tmp_path / "params.yaml")
    baseline = sweeps.parse_exp_show([state("abc", nulls, metrics(50.0, 20.0), name="main")])
    prompts = sweeps.plan_sweep(SWEEPS.get("prompts"), base, baseline, "demo")
    assert [p.status for p in prompts] == ["todo", "todo", "done", "todo", "todo"]
    templates = sweeps.plan_sweep(SWEEPS.get("templates"), base, baseline, "demo")
    # train.templates null means "the bank's count": the pipeline's bank has the profile's 80, so the
    # baseline is the 80-template row
    assert [p.status for p in templates] == ["todo"] * 4 + ["done"]
    banks = sweeps.plan_sweep(SWEEPS.get("banks"), base, baseline, "demo")
    assert [p.status for p in banks] == ["done", "todo", "todo", "todo"]
    assert len(SWEEPS.get("banks").expand("paper-b")) == len(SWEEPS.get("banks").expand("paper-l")) == 6


def test_the_projects_params_file_has_every_key_the_sweeps_set():
    from pathlib import Path

    params = sweeps.flat_params(Path(__file__).resolve().parents[1] / "params.yaml")
    for name in SWEEPS.names():
        for profile in ("demo", "paper-b"):
            sweeps.check_keys(SWEEPS.get(name).expand(profile), params)  # raises naming a missing key


def test_report_renders_a_sweeps_table_from_the_experiments(cli, one_line_error, params_file, monkeypatch, tmp_path):
    baseline = state("abc1234", tree(), metrics(50.0, 20.0), name="main")
    baseline["experiments"] = [
        exp("n2", {**tree(), "bank": {**tree()["bank"], "generator": "noise:0.2"}}, metrics(41.0, 12.0))
    ]
    monkeypatch.setattr(sweeps, "read_records", lambda dvc=None: sweeps.parse_exp_show([baseline]))
    result = cli("report", "--sweep", "banks", "--params", str(params_file), "-o", str(tmp_path / "rep"))
    assert result.exit_code == 0, result.stdout
    written = (tmp_path / "rep" / "banks.md").read_text()
    rows = {
        r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
        for r in written.splitlines()
        if r.startswith("| ") and "setting" not in r
    }
    assert rows["base generator"][2:] == ["50.0", "20.0", "main"]
    assert rows["noise 0.2"][2:] == ["41.0", "12.0", "n2"]
    assert rows["noise 0.6"][2:] == ["—", "—", "todo"]
    one_line_error(cli("report", "--sweep", "banks", str(tmp_path)), "not both")
    one_line_error(cli("report"), "no eval folders given")
