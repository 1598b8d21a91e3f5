"""The DVC stages as one entry point: `python -m pipeline.stages <stage> params.yaml [--set NAME]`.

Each stage resolves the profile + explicit params (pipeline/profiles.py), writes the resolved
section next to its outputs, and calls the stage function:

    data       synthetic shapes (demo) or `dpseg data prepare` of each dataset   -> out/data/<name>
    clip       pretrain the tiny CLIP (demo; a marker elsewhere)                  -> out/clip
    bank-base  the bank of the base generator (procedural / sd15 ...)             -> out/bank-base
    bank       the bank training reads: the base bank (hard links), a noise bank derived from it
               (`bank.generator=noise:<r>`, no regeneration), or another generator built fresh -> out/bank
    train      pipeline.train.loop.train_from_params                            -> out/train
    eval       pipeline.evaluate.loop.eval_from_params, one eval set (--set)
               -> out/eval/<set>, metrics/eval/<set>.json
    seeds      the train stage's recipe at each of `seeds.extra`, each evaluated on every eval set
               -> out/seeds/seed-<s>/{train,eval/<set>}, metrics/seeds.json
    report     the tables (pipeline.evaluate.report) + the demo's results table -> out/report, metrics/miou.csv
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from dpseg.errors import UserError, error_line
from dpseg.io import atomic_write_bytes, atomic_write_json
from pipeline.profiles import eval_set, load_params, resolve

STAGES = ("data", "clip", "bank-base", "bank", "train", "eval", "seeds", "report")
BASE_BANK = "out/bank-base"
METRICS_DIR = Path("metrics")
# bank keys that are not BuildSettings settings: which generator the base bank uses
BANK_STAGE_EXTRA = ("base_generator",)


def resolved_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    return absolute_weights(resolve(load_params(path)))


def absolute_weights(r: dict[str, Any]) -> dict[str, Any]:
    """Encoder weights given as a local file become absolute paths, so the bank, the checkpoint and
    the eval (which compares what the first two recorded) name them the same way."""
    for section in ("bank", "train"):
        weights = r[section].get("encoder_weights")
        if isinstance(weights, str) and weights.endswith(".safetensors"):
            r[section]["encoder_weights"] = str(Path(weights).resolve())
    return r


# --- data ---------------------------------------------------------------------------------


def run_data(r: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    d = r["data"]
    out = Path(d["out"])
    if d["kind"] == "synth":
        from dpseg.data.synth import write_shapes_benchmark

        report = write_shapes_benchmark(
            out / "shapes",
            images=int(d["images"]),
            size=int(d["size"]),
            seed=int(d["seed"]),
            val_images=d.get("val_images"),
            progress=progress,
            background=bool(d.get("background", False)),
            scene_style=str(d.get("scene_style") or "plain"),
        )
        return {"shapes": {"written": report.written, "resumed": report.resumed}}
    if d["kind"] == "prepare":
        if not d.get("src"):
            raise UserError(
                "data.src is not set: point it at the folder holding the raw downloads "
                "(dvc exp run -S data.src=/datasets; docs/data.md lists the layouts)"
            )
        from dpseg.data.datasets import prepare_dataset

        return {name: str(prepare_dataset(name, d["src"], out / name, progress=progress)) for name in d["datasets"]}
    raise UserError(f"data.kind must be synth or prepare, got {d['kind']!r}")


# --- clip ---------------------------------------------------------------------------------


def run_clip(r: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    c = dict(r["clip"])
    if not c.pop("enabled", False):
        # profiles with real CLIP weights skip it; DVC still wants the declared outputs
        note = {"skipped": f"profile {r['profile']} uses pretrained CLIP weights (clip.enabled is false)"}
        atomic_write_json(Path(c["out"]) / "metrics.json", note)
        return note
    from pipeline.clip.pretrain import pretrain_from_params

    return pretrain_from_params(c, progress=progress)


# --- bank ---------------------------------------------------------------------------------


def base_generator(r: dict[str, Any]) -> str:
    """The generator of the base bank: bank.base_generator, else the profile's generator."""
    from pipeline.profiles import PROFILES

    explicit = r["bank"].get("base_generator")
    return str(explicit or PROFILES.get(r["profile"]).defaults("bank")["generator"])


def _bank_settings(r: dict[str, Any], generator: str, out: str) -> dict[str, Any]:
    settings = {k: v for k, v in r["bank"].items() if k not in BANK_STAGE_EXTRA}
    return {**settings, "generator": generator, "out": out}


def run_bank_base(r: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    from pipeline.bank_stage import run_bank_stage

    return run_bank_stage(_bank_settings(r, base_generator(r), BASE_BANK), progress=progress)


def noise_ratio(generator: str) -> float | None:
    if not generator.startswith("noise:"):
        return None
    try:
        ratio = float(generator.split(":", 1)[1])
    except ValueError:
        raise UserError(f"bank.generator {generator!r}: expected noise:<ratio> with a ratio in [0, 1]") from None
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"bank.generator {generator!r}: the noise ratio must be in [0, 1]")
    return ratio


def link_tree(src: Path, dst: Path) -> None:
    """A copy of `src` at `dst` made of hard links (no bytes copied; both are read-only banks)."""
    if dst.exists():
        shutil.rmtree(dst)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:  # another file system: copy
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def run_bank(r: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """out/bank: the base bank as is, derived from it (noise), or built with another generator."""
    out = Path(r["bank"]["out"])
    generator = str(r["bank"]["generator"])
    base = base_generator(r)
    ratio = noise_ratio(generator)
    if not (Path(BASE_BANK) / "bank.json").is_file():
        raise UserError(f"{BASE_BANK} holds no bank; run `dvc repro bank-base` first")
    if ratio is not None:
        from bank.derive import derive_noise_bank

        if out.exists():
            shutil.rmtree(out)
        settings = r["bank"]
        return derive_noise_bank(
            BASE_BANK,
            ratio,
            out,
            batch_size=int(settings.get("batch_size") or 32),
            device=str(settings.get("device") or "cpu").replace("auto", "cpu"),
            progress=progress,
        )
    if generator == base:
        link_tree(Path(BASE_BANK), out)
        return {"linked": BASE_BANK}
    from pipeline.bank_stage import run_bank_stage

    return run_bank_stage(_bank_settings(r, generator, str(out)), progress=progress)


# --- train / eval / report ----------------------------------------------------------------


def run_train(r: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    from pipeline.train.loop import train_from_params

    return train_from_params(r["train"], progress=progress)


PASS_KEYS = ("miou", "fwiou", "pacc", "macc", "uniform_random_miou")


def compact_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """What `dvc metrics show` lists for one eval set: per pass the headline numbers."""
    out: dict[str, Any] = {}
    for p, scores in sorted(metrics.get("passes", {}).items()):
        out[f"pass{p}"] = {k: scores[k] for k in PASS_KEYS if k in scores}
    if "pass2_minus_pass1_miou" in metrics:
        out["pass2_minus_pass1_miou"] = metrics["pass2_minus_pass1_miou"]
    boot = metrics.get("paired_bootstrap")
    if boot and boot.get("ci95"):
        out["pass2_minus_pass1_ci95"] = boot["ci95"]
    diag = metrics.get("diagnostics", {})
    if "pass2_oracle" in diag:  # a diagnostic (ground-truth crops), never a headline
        out["diagnostic_pass2_oracle_miou"] = diag["pass2_oracle"]["miou"]
        out["diagnostic_share_of_oracle_gain_closed"] = diag.get("share_of_oracle_gain_closed")
    out["images"] = metrics.get("images")
    return out


def checkpoint_uses_visual(checkpoint: str) -> bool:
    from dpseg.model.checkpoint import read_checkpoint_config
    from dpseg.model.config import DPSegConfig

    return DPSegConfig.from_dict(read_checkpoint_config(Path(checkpoint))["model"]).uses_visual


def run_eval(r: dict[str, Any], name: str, progress: bool = True) -> dict[str, Any]:
    settings = eval_set(r, name)
    metrics = _evaluate(settings, progress)
    if _is_main(settings):
        atomic_write_json(METRICS_DIR / "eval" / f"{name}.json", compact_metrics(metrics))
    return metrics


def _is_main(settings: dict[str, Any]) -> bool:
    """Under `accelerate launch` (the stage's shards split over ranks) the main rank owns the folders."""
    from bank.runtime import distributed_state

    return distributed_state(settings.get("device") or "auto").is_main_process


def _evaluate(settings: dict[str, Any], progress: bool) -> dict[str, Any]:
    """One eval set as the stages run it, into a fresh `settings["out"]`."""
    from bank.runtime import distributed_state
    from pipeline.evaluate.loop import eval_from_params

    if int(settings.get("passes") or 1) == 2 and not checkpoint_uses_visual(settings["checkpoint"]):
        # a text-only model has no visual prompts for pass II to replace, nor for its oracle diagnostic
        settings["passes"], settings["oracle"] = 1, False
    out = Path(settings["out"])
    state = distributed_state(settings.get("device") or "auto")
    if out.exists() and state.is_main_process:  # DVC removed it already; by hand, a stale run would be refused
        shutil.rmtree(out)
    state.wait_for_everyone()
    return eval_from_params(settings, progress=progress and state.is_main_process)


def extra_seeds(r: dict[str, Any]) -> list[int]:
    """`seeds.extra`: other training seeds than the train stage's, each at most once."""
    from pipeline.train.loop import recipe_from_params

    seeds = r["seeds"].get("extra") or []
    main = recipe_from_params(r["train"]).seed
    ok = isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    if not ok or len(set(seeds)) != len(seeds) or main in seeds:
        raise UserError(
            f"params.yaml seeds.extra: a list of distinct whole numbers other than train.seed ({main}), got {seeds!r}"
        )
    return seeds


def run_seeds(r: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """The seed spread: for each seed of `seeds.extra`, the train stage's recipe at that seed,
    then every eval set as the eval stage runs it (without saved predictions), so every result
    of the demo comes with a second training run beside it."""
    from pipeline.train.loop import train_from_params

    out = Path(r["seeds"].get("out") or "out/seeds")
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    for seed in extra_seeds(r):
        run = out / f"seed-{seed}"
        # 1. train: the train section at this seed, into this seed's folder
        train_from_params({**r["train"], "seed": seed, "out": str(run / "train")}, progress=progress)
        # 2. evaluate its checkpoint on every eval set
        result[str(seed)] = {}
        for name in r["eval"].get("sets") or []:
            settings = {
                **eval_set(r, name),
                "checkpoint": str(run / "train" / "checkpoint"),
                "out": str(run / "eval" / name),
                "save_predictions": 0,
            }
            result[str(seed)][name] = compact_metrics(_evaluate(settings, progress))
    if _is_main({"device": r["eval"].get("device")}):
        atomic_write_json(METRICS_DIR / "seeds.json", {"seeds": result})
    return result


def results_table(r: dict[str, Any]) -> str:
    """Markdown: one row per eval set, pass I / pass II mIoU, the change with its paired-bootstrap
    95% interval over images, the uniform-random baseline; where the eval ran the oracle
    diagnostic, the share of its gain pass II closes (in a column marked as a diagnostic). With
    `seeds.extra`, a second table gives the same per training seed."""
    rows = [
        "| set | classes | images | pass I mIoU | pass II mIoU | II - I [95% CI] | uniform random "
        "| diagnostic: oracle pass II, share of its gain closed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sets = r["eval"].get("sets") or []
    for name in sets:
        path = METRICS_DIR / "eval" / f"{name}.json"
        if not path.is_file():
            rows.append(f"| {name} | – | – | – | – | – | – | – |")
            continue
        m = json.loads(path.read_text())
        full = Path("out/eval") / name / "metrics.json"
        classes = len(json.loads(full.read_text()).get("class_ids", [])) if full.is_file() else "–"
        p1, p2, change, oracle = _result_cells(m)
        random = _number(m.get("pass1", {}).get("uniform_random_miou"))
        rows.append(f"| {name} | {classes} | {m.get('images', '–')} | {p1} | {p2} | {change} | {random} | {oracle} |")
    seeds_path = METRICS_DIR / "seeds.json"
    extra = json.loads(seeds_path.read_text()).get("seeds", {}) if seeds_path.is_file() else {}
    if extra:
        from pipeline.train.loop import recipe_from_params

        main_seed = recipe_from_params(r["train"]).seed
        rows += [
            "",
            "Per training seed (the train stage's, then `seeds.extra`; each trained and evaluated alike):",
            "",
            "| training seed | set | pass I mIoU | pass II mIoU | II - I [95% CI] "
            "| diagnostic: oracle pass II, share of its gain closed |",
            "|---|---|---|---|---|---|",
        ]
        main_runs = {n: METRICS_DIR / "eval" / f"{n}.json" for n in sets}
        main_runs = {n: json.loads(p.read_text()) for n, p in main_runs.items() if p.is_file()}
        runs = [(main_seed, main_runs)] + [(int(seed), by_set) for seed, by_set in extra.items()]
        for seed, by_set in runs:
            for name in sets:
                m = by_set.get(name)
                cells = _result_cells(m) if m else ("–",) * 4
                rows.append(f"| {seed} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _number(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _result_cells(m: dict[str, Any]) -> tuple[str, str, str, str]:
    """pass I, pass II, the change with its interval, and the oracle diagnostic of compact metrics."""
    change = _number(m.get("pass2_minus_pass1_miou"))
    if m.get("pass2_minus_pass1_ci95"):
        low, high = m["pass2_minus_pass1_ci95"]
        change = f"{m['pass2_minus_pass1_miou']:+.1f} [{low:+.1f}, {high:+.1f}]"
    oracle = "–"
    if m.get("diagnostic_pass2_oracle_miou") is not None:
        share = m.get("diagnostic_share_of_oracle_gain_closed")
        oracle = f"{m['diagnostic_pass2_oracle_miou']:.1f}, " + ("–" if share is None else f"{100 * share:.0f}%")
    p1, p2 = m.get("pass1", {}), m.get("pass2", {})
    return _number(p1.get("miou")), _number(p2.get("miou")), change, oracle


def run_report(r: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    from pipeline.evaluate.report import render_report

    sets = list(r["eval"].get("sets") or [])
    rep = r["report"]
    out = Path(rep.get("out") or "out/report")
    result = render_report(
        [f"out/eval/{s}" for s in sets],
        labels=sets,
        out=str(out),
        panels=int(rep.get("panels", 2)),
        title=str(rep.get("title", "dpseg report")),
    )
    table = results_table(r)
    atomic_write_bytes(out / "results.md", (f"# {rep.get('title', 'results')}\n\n{table}\n").encode())
    rows = ["run,set,pass,miou"]
    for s in sets:
        m = json.loads((METRICS_DIR / "eval" / f"{s}.json").read_text())
        rows += [f"{s} pass {p[4:]},{s},{p[4:]},{m[p]['miou']}" for p in sorted(m) if p[4:].isdigit()]
    atomic_write_bytes(METRICS_DIR / "miou.csv", ("\n".join(rows) + "\n").encode())
    return {"report": result["path"], "results": str(out / "results.md"), "table": table}


# --- params: every value each stage will use ------------------------------------------------


def stage_params(r: dict[str, Any]) -> dict[str, Any]:
    """The resolved params with each section completed by its settings class's defaults: exactly
    the values the stages run with (`python -m pipeline.stages params`)."""
    from dataclasses import asdict

    from pipeline.bank_stage import build_settings, settings_view
    from pipeline.clip.pretrain import ClipPretrainSettings
    from pipeline.evaluate.loop import EvalSettings
    from pipeline.train.loop import recipe_from_params

    out: dict[str, Any] = {"profile": r["profile"], "data": dict(r["data"])}
    clip = dict(r["clip"])
    enabled = bool(clip.pop("enabled", False))
    out["clip"] = {"enabled": enabled, **(asdict(ClipPretrainSettings.from_dict(clip)) if enabled else clip)}
    bank = settings_view(build_settings(_bank_settings(r, str(r["bank"]["generator"]), str(r["bank"]["out"]))))
    out["bank"] = {**bank, "base_generator": base_generator(r)}
    out["train"] = asdict(recipe_from_params(r["train"]))
    out["eval"] = {"sets": list(r["eval"].get("sets") or [])}
    for name in out["eval"]["sets"]:
        settings = EvalSettings(**eval_set(r, name))
        out["eval"][name] = asdict(settings)
    out["seeds"] = {**r["seeds"], "extra": extra_seeds(r)}
    out["report"] = dict(r["report"])
    return out


RUNNERS = {
    "data": run_data,
    "clip": run_clip,
    "bank-base": run_bank_base,
    "bank": run_bank,
    "train": run_train,
    "seeds": run_seeds,
    "report": run_report,
}


def reproducible(r: dict[str, Any]) -> None:
    """Every stage: the params' CPU thread count and torch's deterministic algorithms, so the same
    commit and params give the same bytes (docs/pipeline.md, "Reproducibility")."""
    from dpseg.reproducibility import deterministic, set_threads

    set_threads(r.get("threads"))
    deterministic()


def run_stage(
    stage: str, params_path: str | Path = "params.yaml", set_name: str | None = None, progress: bool = True
) -> dict[str, Any]:
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    r = resolved_params(params_path)
    reproducible(r)
    if stage == "eval":
        if not set_name:
            raise UserError("the eval stage needs --set NAME (one of params.yaml eval.sets)")
        return run_eval(r, set_name, progress=progress)
    return RUNNERS[stage](r, progress=progress)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.stages", description=__doc__.splitlines()[0])
    parser.add_argument(
        "stage",
        choices=(*STAGES, "table", "params"),
        help="a stage; `table`: print the results table; `params`: print every value the stages will use",
    )
    parser.add_argument("params", nargs="?", default="params.yaml")
    parser.add_argument("--set", dest="set_name", default=None, help="eval set (eval stage)")
    args = parser.parse_args(argv)
    try:
        if args.stage == "table":
            print(results_table(resolved_params(args.params)))
            return
        if args.stage == "params":
            print(yaml.safe_dump(stage_params(resolved_params(args.params)), sort_keys=False), end="")
            return
        result = run_stage(args.stage, args.params, args.set_name, progress=sys.stderr.isatty())
    except (UserError, OSError) as err:
        print(f"Error: {error_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.stage == "report":
        print(result["table"])
    elif args.stage == "clip" and "zero_shot_accuracy" in result:
        photo = result.get("photo", {}).get("zero_shot_accuracy")
        print(
            f"zero-shot accuracy {result['zero_shot_accuracy']:.3f} over 48 categories (chance {result['chance']:.3f})"
            + ("" if photo is None else f"; {photo:.3f} on the same renders under photo conditions")
        )


if __name__ == "__main__":
    main()
