"""The prompt-modes report of the demo profile: text-only / visual-only / dual prompts (the
`prompts` sweep's first rows), each trained on the seen categories and evaluated on seen and
unseen, pass I and pass II, with the command that made each row (docs/demo_report.md).

    python -m pipeline.analyze.prompt_modes [--run]
"""

from __future__ import annotations

from pathlib import Path

REPORT_POINTS = ("text", "visual", "dual")
PARAGRAPH_PLACEHOLDER = (
    "_What the numbers say about the paper's claims at this scale (text vs visual vs dual, "
    "pass II vs pass I, seen vs unseen), including where they do not hold: written by whoever "
    "ran the experiments above._"
)


def prompt_modes_report(
    params_file: str | Path = "params.yaml",
    run: bool = False,
    out: str | Path = "out/report/demo.md",
    paragraph: str | None = None,
    dvc: str | None = None,
    echo=print,
) -> dict:
    """Runs (with `run`) the missing text/visual/dual experiments as `dvc exp run`s, then writes
    the demo report: one row per prompt mode, seen/unseen x pass I/II mIoU + the uniform-random
    baseline, each with its command. Experiments are found by their parameters (pipeline.analyze.sweeps),
    so ones run by hand count too."""
    from dpseg.io import atomic_write_bytes
    from pipeline.analyze import sweeps

    sweep = sweeps.SWEEPS.get("prompts")
    points = [p for p in sweep.points if p.label in REPORT_POINTS]
    selected = sweeps.Sweep("demo-prompts", sweep.table, sweep.title, tuple(points), sweep.notes)
    if run:
        name = "demo-prompts"
        registered = name in sweeps.SWEEPS.names()
        if not registered:
            sweeps.SWEEPS.register(name, selected)
        result = sweeps.run_sweep(name, params_file, dvc=dvc, echo=echo)
        if result["failed"]:
            from dpseg.errors import UserError

            raise UserError(f"experiments failed: {', '.join(result['failed'])}; see `dvc exp show`")
    records = sweeps.read_records(dvc)
    base = sweeps.flat_params(params_file)
    planned = sweeps.plan_sweep(selected, base, records, sweeps.profile_of(base))
    sets = ("seen", "unseen")
    header = (
        "| prompts | "
        + " | ".join(f"{s} pass {p}" for s in sets for p in ("I", "II"))
        + " | "
        + " | ".join(f"{s} uniform" for s in sets)
        + " | command |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for item in planned:
        m = item.record.metrics if item.record is not None and item.status == "done" else {}

        def f(key: str, m: dict = m) -> str:
            value = m.get(key)
            return "—" if value is None else f"{value:.1f}"

        cells = [f(f"metrics/eval/{s}.json:pass{p}.miou") for s in sets for p in (1, 2)]
        cells += [f(f"metrics/eval/{s}.json:pass1.uniform_random_miou") for s in sets]
        command = "dvc exp run " + " ".join(sweeps.set_args(item.point))
        lines.append(f"| {item.point.label} | " + " | ".join(cells) + f" | `{command}` |")
    text = "\n".join(
        [
            "# dpseg demo: text / visual / dual prompts, pass I / pass II, seen / unseen",
            "",
            "mIoU (%) on the shapes val split; `seen` = the 36 training categories, `unseen` = the 12 "
            "held-out ones evaluated with their own vocabulary; `uniform` = a uniform-random predictor on "
            "the same ground truth. Reproduce: `python -m pipeline.analyze.prompt_modes --run`.",
            "",
            *lines,
            "",
            paragraph or PARAGRAPH_PLACEHOLDER,
            "",
        ]
    )
    atomic_write_bytes(out, text.encode())
    return {"markdown": text, "path": str(out)}


if __name__ == "__main__":
    import argparse
    import sys

    from dpseg.errors import UserError, error_line

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.analyze.prompt_modes", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--run", action="store_true", help="run the missing experiments first (dvc exp run)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="out/report/demo.md")
    parser.add_argument("--paragraph", default=None, help="the closing paragraph (text)")
    args = parser.parse_args()
    try:
        print(prompt_modes_report(args.params, run=args.run, out=args.out, paragraph=args.paragraph)["markdown"])
    except (UserError, OSError) as err:
        print(f"Error: {error_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
