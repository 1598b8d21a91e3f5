"""The paper's ablation tables as named DVC experiment sweeps (`dpseg analyze sweep NAME`).

A sweep is a list of points; a point is a row label and the params.yaml values it sets
(`dvc exp run -S key=value ...`). Every other parameter stays as params.yaml has it, so the
same sweep runs the demo profile on a laptop and the paper profile on a cluster.

Resuming: before running, the sweep reads `dvc exp show --json` and skips every point whose
full parameter set (params.yaml with the point's values applied) already belongs to an
experiment — or a baseline commit — with metrics; points that are queued or running are not
queued again. Nothing is keyed by experiment name, so a renamed or hand-run experiment with
the same params counts too.

    for point in SWEEPS.get("prompts").expand(profile="demo"):
        print(point.label, set_args(point))   # ['-S', 'train.prompt_mode=text', ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpseg.errors import UserError
from dpseg.registry import Registry

# params.yaml keys the sweeps set (one place to follow the pipeline's params file)
PROMPT_MODE = "train.prompt_mode"
FUSION = "train.fusion"
GUIDANCE = "train.visual_guidance"
MODEL_OVERRIDES = "train.model_overrides"  # any DPSegConfig field goes through it
GUIDANCE_STAGES = f"{MODEL_OVERRIDES}.guidance_stages"
TRAIN_TEMPLATES = "train.templates"
BANK_TEMPLATES = "bank.templates"
GENERATOR = "bank.generator"


@dataclass(frozen=True)
class Point:
    label: str  # the row of the table
    params: dict[str, Any]  # params.yaml dotted key -> value
    group: str = ""  # sub-table ("a: prompts", "b: fusion"); a point may serve several tables
    profiles: tuple[str, ...] = ()  # only under these profiles (empty: every profile)


@dataclass(frozen=True)
class Sweep:
    name: str
    table: str  # the paper's table
    title: str
    points: tuple[Point, ...]
    notes: str = ""

    def expand(self, profile: str | None = None) -> list[Point]:
        """The points to run under `profile` (points restricted to other profiles dropped; "paper"
        covers paper-b and paper-l)."""

        def allowed(p: Point) -> bool:
            return not p.profiles or any(profile == q or str(profile).startswith(q + "-") for q in p.profiles)

        return [p for p in self.points if allowed(p)]

    def skipped(self, profile: str | None = None) -> list[Point]:
        return [p for p in self.points if p not in self.expand(profile)]


SWEEPS: Registry[Sweep] = Registry("sweep")


def _dual(fusion: str, guidance: str = "prompt") -> dict[str, Any]:
    return {PROMPT_MODE: "dual", FUSION: fusion, GUIDANCE: guidance}


SWEEPS.register(
    "prompts",
    Sweep(
        "prompts",
        "Table 2",
        "Prompt strategy (a) and cost-volume fusion (b)",
        (
            # text only = SED: no visual prompts, so no visual cost volumes in the decoder either
            Point("text", {PROMPT_MODE: "text", FUSION: "avg-embeddings", GUIDANCE: "none"}, "a: prompts"),
            Point("visual", {PROMPT_MODE: "visual", FUSION: "avg-embeddings", GUIDANCE: "prompt"}, "a: prompts"),
            Point("dual", _dual("avg-embeddings"), "a: prompts"),
            Point("dual, concat costs", _dual("concat-costs"), "b: fusion"),
            Point("dual, average costs", _dual("avg-costs"), "b: fusion"),
        ),
        notes="The 'dual' row (average of embeddings, Eq. 1) is also Table 2b's first row.",
    ),
)

SWEEPS.register(
    "guidance",
    Sweep(
        "guidance",
        "Table 3",
        "Decoder guidance: visual cost volumes per stage, or the upsampled initial cost volume",
        (
            Point("no visual cost volumes", _dual("avg-embeddings", "none")),
            Point("stage 1 (stride 16)", {**_dual("avg-embeddings"), GUIDANCE_STAGES: [True, False, False]}),
            Point("stages 1-2 (strides 16, 8)", {**_dual("avg-embeddings"), GUIDANCE_STAGES: [True, True, False]}),
            Point("stages 1-3 (strides 16, 8, 4)", _dual("avg-embeddings")),  # the model's default: every stage
            Point("upsampled initial cost volume", _dual("avg-embeddings", "upsampled-cost")),
        ),
        notes="Per-stage switches are DPSegConfig.guidance_stages (through train.model_overrides); the full row "
        "leaves it at its default, every stage.",
    ),
)

TEMPLATE_COUNTS = (1, 10, 20, 40, 80)
SWEEPS.register(
    "templates",
    Sweep(
        "templates",
        "Table 4",
        "Number of prompt templates",
        tuple(
            Point(f"{k} template{'s' * (k > 1)}", {BANK_TEMPLATES: max(TEMPLATE_COUNTS), TRAIN_TEMPLATES: k})
            for k in TEMPLATE_COUNTS
        ),
        notes="One bank of 80 templates serves every row (DVC builds it once); training reads its first K.",
    ),
)

SWEEPS.register(
    "banks",
    Sweep(
        "banks",
        "Table 5",
        "Robustness to the visual-prompt bank",
        (
            Point("base generator", {}),
            *(Point(f"noise {r}", {GENERATOR: f"noise:{r}"}) for r in (0.2, 0.6, 0.8)),
            Point("sd3", {GENERATOR: "sd3"}, profiles=("paper",)),
            Point("layerdiffuse", {GENERATOR: "layerdiffuse"}, profiles=("paper",)),
        ),
        notes="'base generator' is the profile's own bank.generator; sd3 and layerdiffuse need their weights "
        "(paper profile only).",
    ),
)


# ---- params ----------------------------------------------------------------------------------
def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"fusion": "x"}} -> {"train.fusion": "x"} (lists are values)."""
    flat: dict[str, Any] = {}
    for key, value in (tree or {}).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def flat_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """params.yaml flattened to dotted keys (`train.steps`), as `dvc exp show` names them."""
    from pipeline.profiles import load_params

    return flatten(load_params(path))


def profile_of(params: dict[str, Any]) -> str | None:
    """The profile a flat params dict declares (a top-level or namespaced `profile` key)."""
    for key in ("profile", *sorted(k for k in params if k.endswith(".profile"))):
        if key in params and params[key] is not None:
            return str(params[key])
    return None


def _parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def check_keys(points: Sequence[Point], params: dict[str, Any]) -> None:
    """Every key a sweep sets must be in params.yaml, or sit under a mapping that is (an empty
    `model_overrides: {}` takes any model field)."""

    def known(key: str) -> bool:
        if key in params:
            return True
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if "." not in parent:  # a section's own key (train.fusion) must be there
            return False
        return isinstance(params.get(parent), dict) or any(k.startswith(parent + ".") for k in params)

    missing = sorted({k for p in points for k in p.params if not known(k)})
    if missing:
        raise UserError(
            f"params.yaml has no {', '.join(missing)}; the sweep sets these keys "
            "(pipeline/analyze/sweeps.py "
            "names them): add them to params.yaml or update the sweep"
        )


def expected_params(base: dict[str, Any], point: Point) -> dict[str, Any]:
    """params.yaml with the point applied, flat. A point key under an empty mapping replaces it
    (DVC records `model_overrides: {guidance_stages: ...}` as the nested key alone)."""
    covered = {parent for key in point.params for parent in _parents(key)}
    return {**{k: v for k, v in base.items() if k not in covered}, **point.params}


def normalise(value: Any) -> Any:
    """One spelling per value: '80' and 80, 'null' and None, tuples and lists compare equal."""
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return parsed if isinstance(parsed, (int, float, bool, type(None))) else value
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def format_value(value: Any) -> str:
    """A value as `-S key=value` wants it (YAML flow style)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def set_args(point: Point, new_keys: Sequence[str] = ()) -> list[str]:
    """`-S key=value` per parameter; a key params.yaml does not have yet is appended
    (`+key=value`, as DVC's Hydra overrides require)."""
    args: list[str] = []
    for key, value in point.params.items():
        args += ["-S", f"{'+' if key in new_keys else ''}{key}={format_value(value)}"]
    return args


def experiment_name(sweep: str, point: Point, expected: dict[str, Any]) -> str:
    """A git-ref-safe name: sweep, row label, and a hash of the full params (so a changed
    baseline gives new names instead of colliding with old experiments)."""
    slug = re.sub(r"[^a-z0-9]+", "-", point.label.lower()).strip("-")
    digest = hashlib.sha256(json.dumps(normalise(sorted(expected.items())), default=str).encode()).hexdigest()[:6]
    return f"{sweep}-{slug}-{digest}"


# ---- experiment records (`dvc exp show --json`) ----------------------------------------------
@dataclass
class ExpRecord:
    rev: str
    name: str | None
    params: dict[str, Any]  # flat, every params file merged
    metrics: dict[str, Any]  # flat "file:dotted.key" -> value
    state: str  # success | queued | running | failed | baseline
    baseline: bool = False

    @property
    def has_results(self) -> bool:
        return self.state in ("success", "baseline") and bool(self.metrics)


def _file_data(files: dict | None) -> dict[str, Any]:
    return {f: (r or {}).get("data") or {} for f, r in (files or {}).items()}


def _record(state: dict, executor_state: str | None, baseline: bool) -> ExpRecord:
    data = state.get("data") or {}
    params: dict[str, Any] = {}
    for _, tree in sorted(_file_data(data.get("params")).items()):
        params.update(flatten(tree))
    metrics = {}
    for file, tree in _file_data(data.get("metrics")).items():
        metrics.update({f"{file}:{k}": v for k, v in flatten(tree).items()})
    failed = state.get("error") is not None
    status = "failed" if failed else ("baseline" if baseline else (executor_state or "success"))
    return ExpRecord(
        rev=state.get("rev", ""),
        name=state.get("name"),
        params=params,
        metrics=metrics,
        state=status,
        baseline=baseline,
    )


def parse_exp_show(rows: list[dict]) -> list[ExpRecord]:
    """Records from `dvc exp show --json` (DVC 3): baseline commits and their experiments.
    The workspace row is left out: its metrics may predate edits to its params."""
    records: list[ExpRecord] = []
    for row in rows or []:
        if row.get("rev") != "workspace":
            records.append(_record(row, None, baseline=True))
        for exp_range in row.get("experiments") or []:
            executor = (exp_range.get("executor") or {}).get("state")
            revs = exp_range.get("revs") or []
            if revs:  # the newest state of that experiment comes first
                record = _record(revs[0], executor, baseline=False)
                record.name = record.name or exp_range.get("name")
                records.append(record)
    return records


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _train_defaults() -> dict[str, Any]:
    try:
        from pipeline.train.loop import TrainSettings
    except ImportError:
        return {}
    out = {}
    for f in dataclasses.fields(TrainSettings):
        if f.default is not dataclasses.MISSING:
            out[f"train.{f.name}"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f"train.{f.name}"] = f.default_factory()
    return out


def canonical(flat: dict[str, Any]) -> dict[str, Any]:
    """The parameters an experiment actually ran with: params.yaml's nulls filled by its profile
    (pipeline.profiles.resolve) and training's own defaults, so `prompt_mode: null` under a
    profile whose default is dual equals an explicit `dual`. Params the profiles cannot resolve
    (another schema) are compared as written."""
    try:
        from pipeline.profiles import resolve
    except ImportError:
        return flat
    try:
        resolved = flatten(resolve(unflatten(flat)))
    except (UserError, TypeError, AttributeError):
        return flat
    for key, value in _train_defaults().items():
        if key not in resolved and not any(k.startswith(key + ".") for k in resolved):
            resolved[key] = value
    if resolved.get(TRAIN_TEMPLATES) is None and resolved.get(BANK_TEMPLATES) is not None:
        # training reads the pipeline's bank (out/bank, built with bank.templates): null = that count
        resolved[TRAIN_TEMPLATES] = resolved[BANK_TEMPLATES]
    return resolved


def matches(expected: dict[str, Any], record: ExpRecord) -> bool:
    """The record ran with every expected value, and with exactly the expected model overrides (a
    free-form mapping: an override the point does not set, such as another point's
    guidance_stages, makes it another experiment)."""
    want, have = canonical(expected), canonical(record.params)
    if _overrides(want) != _overrides(have):
        return False
    return all(k in have and normalise(have[k]) == normalise(v) for k, v in want.items())


def _overrides(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: normalise(v) for k, v in flat.items() if k == MODEL_OVERRIDES or k.startswith(MODEL_OVERRIDES + ".")}


@dataclass
class PlannedPoint:
    point: Point
    name: str
    expected: dict[str, Any]
    status: str  # done | pending (queued/running) | todo
    record: ExpRecord | None = None
    rerun_name: bool = False  # a finished experiment without metrics carries this name: overwrite it
    new_keys: tuple[str, ...] = ()  # keys params.yaml lacks (under an empty mapping): appended


def plan_sweep(sweep: Sweep, base: dict[str, Any], records: list[ExpRecord], profile: str | None) -> list[PlannedPoint]:
    """What to do for each point: already done (and by which record), pending, or to run."""
    points = sweep.expand(profile)
    check_keys(points, base)
    planned = []
    for point in points:
        expected = expected_params(base, point)
        name = experiment_name(sweep.name, point, expected)
        new_keys = tuple(k for k in point.params if k not in base)
        same = [r for r in records if matches(expected, r)]
        done = next((r for r in same if r.has_results), None)
        pending = next((r for r in same if r.state in ("queued", "running")), None)
        if done:
            planned.append(PlannedPoint(point, name, expected, "done", done, new_keys=new_keys))
        elif pending:
            planned.append(PlannedPoint(point, name, expected, "pending", pending, new_keys=new_keys))
        else:
            # a finished experiment (a git ref) without metrics holds the name: overwrite it; a failed
            # one left no ref, so forcing (which also reruns every unchanged stage) is not needed
            taken = any(r.name == name and r.state == "success" for r in records)
            planned.append(PlannedPoint(point, name, expected, "todo", None, rerun_name=taken, new_keys=new_keys))
    return planned


# ---- running ---------------------------------------------------------------------------------
Runner = Callable[[list[str]], "subprocess.CompletedProcess"]


def default_dvc() -> str:
    """The `dvc` installed beside this Python (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else "dvc"


def run_command(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, text=True, capture_output=False)


def read_records(dvc: str | None = None, runner: Callable[[list[str]], str] | None = None) -> list[ExpRecord]:
    """`dvc exp show --json` -> records (all baselines' experiments)."""
    dvc = dvc or default_dvc()
    args = [dvc, "exp", "show", "--json", "--no-fetch"]
    if runner is None:
        try:
            out = subprocess.run(args, check=False, text=True, capture_output=True)
        except FileNotFoundError:
            raise UserError(f"{dvc!r} not found; install the project (pip install -e .) so `dvc` is on PATH") from None
        if out.returncode != 0:
            reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"`{' '.join(args)}` failed ({reason}); run the sweep inside the project's git+DVC repo")
        text = out.stdout
    else:
        text = runner(args)
    return parse_exp_show(json.loads(text or "[]"))


def exp_run_args(planned: PlannedPoint, queue: bool, dvc: str | None = None) -> list[str]:
    args = [dvc or default_dvc(), "exp", "run", "--name", planned.name]
    args += ["--queue"] if queue else ["--temp"]  # --temp: the workspace (params.yaml) stays as it is
    if planned.rerun_name:
        args.append("--force")
    return args + set_args(planned.point, planned.new_keys)


def run_sweep(
    name: str,
    params_file: str | Path = "params.yaml",
    queue_only: bool = False,
    queue: bool = False,
    jobs: int = 1,
    dvc: str | None = None,
    runner: Runner = run_command,
    records_reader: Callable[[], list[ExpRecord]] | None = None,
    echo=print,
) -> dict[str, Any]:
    """Runs (or queues) the points of sweep `name` that have no results yet; returns the plan
    and what was done. Default: one `dvc exp run --temp` after another (a killed sweep resumes
    at the first point without results); `queue`: queue them and start `jobs` workers;
    `queue_only`: queue them and stop."""
    sweep = SWEEPS.get(name)
    dvc = dvc or default_dvc()
    base = flat_params(params_file)
    profile = profile_of(base)
    records = (records_reader or (lambda: read_records(dvc)))()
    planned = plan_sweep(sweep, base, records, profile)
    for p in sweep.skipped(profile):
        echo(f"skip   {p.label}: profile {', '.join(p.profiles)} only (this is {profile or 'no profile'})")
    failed = []
    for item in planned:
        if item.status != "todo":
            echo(
                f"{item.status:<6} {item.point.label}"
                + (f" ({item.record.name or item.record.rev[:7]})" if item.record else "")
            )
            continue
        args = exp_run_args(item, queue or queue_only, dvc)
        echo(("queue  " if queue or queue_only else "run    ") + " ".join(args))
        result = runner(args)
        if result.returncode != 0:
            failed.append(item.point.label)
            if not (queue or queue_only):
                break  # a broken pipeline fails every point alike; rerun resumes here
        else:
            item.status = "pending" if queue or queue_only else "ran"
    if queue and not queue_only and any(i.status == "pending" for i in planned):  # what did queue still runs
        args = [dvc, "queue", "start", "--jobs", str(jobs)]
        echo("start  " + " ".join(args))
        runner(args)
    return {
        "sweep": name,
        "table": sweep.table,
        "profile": profile,
        "failed": failed,
        "points": [
            {"label": i.point.label, "name": i.name, "status": i.status, "params": i.point.params} for i in planned
        ],
        "skipped": [p.label for p in sweep.skipped(profile)],
    }


# ---- the table -------------------------------------------------------------------------------
def metric_columns(records: list[ExpRecord], metric: str = "miou") -> list[str]:
    """Numeric metric keys (file:dotted.key) whose last part is `metric` (a regex, matched
    whole), in first-seen order."""
    regex = re.compile(metric, re.IGNORECASE)
    columns: list[str] = []
    for r in records:
        columns.extend(
            k
            for k, v in r.metrics.items()
            if regex.fullmatch(re.split(r"[:.]", k)[-1])
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and k not in columns
        )
    return columns


def short_headers(columns: list[str]) -> list[str]:
    """Headers without the words every column shares: 'out/eval/unseen/metrics.json:passes.2.miou'
    beside '.../seen/...:passes.1.miou' -> 'unseen pass2', 'seen pass1'."""
    if not columns:  # no point has results yet: the table is all '—'
        return []
    if len(columns) == 1:
        return [columns[0].rsplit(":", 1)[-1]]
    words = [[w for w in re.split(r"[:./]", re.sub(r"passes\.(\d+)", r"pass\1", c)) if w] for c in columns]
    common = set.intersection(*(set(w) for w in words))
    return [" ".join(w for w in ws if w not in common) or ws[-1] for ws in words]


def sweep_table(
    name: str,
    params_file: str | Path = "params.yaml",
    records: list[ExpRecord] | None = None,
    metric: str = "miou",
    dvc: str | None = None,
) -> str:
    """The sweep as a Markdown table in the paper's form: one row per point, the metrics of the
    experiment holding its params (or '—' where none has results yet)."""
    sweep = SWEEPS.get(name)
    base = flat_params(params_file)
    records = read_records(dvc) if records is None else records
    planned = plan_sweep(sweep, base, records, profile_of(base))
    found = [p.record for p in planned if p.record is not None and p.status == "done"]
    columns = metric_columns(found, metric)
    headers = short_headers(columns)
    lines = [
        f"**{sweep.table}: {sweep.title}** (profile {profile_of(base) or '-'})",
        "",
        "| | " + " | ".join(["setting", *headers, "experiment"]) + " |",
        "|---" * (len(headers) + 3) + "|",
    ]
    for p in planned:
        values = [_fmt(p.record.metrics.get(c)) if p.status == "done" else "—" for c in columns]
        where = (p.record.name or p.record.rev[:7]) if p.status == "done" else p.status
        setting = ", ".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in p.point.params.items())
        setting = setting or "(params.yaml)"
        row = f"{p.point.group} {p.point.label}".strip()
        lines.append(f"| {row} | " + " | ".join([setting, *values, where]) + " |")
    if sweep.notes:
        lines += ["", sweep.notes]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.1f}"  # dpseg.metrics reports percent
    return str(value)
