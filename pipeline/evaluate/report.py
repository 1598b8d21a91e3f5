"""`dpseg report`: the paper's tables from stored metrics, and per-image panels.

    result = render_report(["out/eval/shapes-seen", "out/eval/shapes-unseen"], labels=["seen", "unseen"],
                           out="out/report", panels=4)
    result["markdown"], result["path"], result["panels"]

Table 1 form: benchmarks as columns, pass I / pass II as rows, the paper's ConvNeXt-B numbers
beside ours. Table 5 form: one row per bank (its generator), pass I / II / gain per benchmark.
Panels: image | ground truth | pass I | pass II, with a legend of the classes shown (needs the
eval's --save-predictions).
"""

from __future__ import annotations

import json
from pathlib import Path
from shlex import quote

import numpy as np

from dpseg.errors import UserError
from dpseg.io import atomic_write_bytes

# mIoU, ConvNeXt-B, trained on COCO-Stuff (paper Table 1; SED = text prompts only)
PAPER_COLUMNS = {"ade-847": "A-847", "pc-459": "PC-459", "ade-150": "A-150", "pc-59": "PC-59", "voc-20": "PAS-20"}
PAPER = {
    "SED (paper, text only)": {"A-847": 11.4, "PC-459": 18.6, "A-150": 31.6, "PC-59": 57.3, "PAS-20": 94.4},
    "DPSeg pass I (paper)": {"A-847": 12.0, "PC-459": 19.5, "A-150": 32.9, "PC-59": 58.1, "PAS-20": 96.0},
    "DPSeg pass II (paper)": {"A-847": 12.5, "PC-459": 20.1, "A-150": 33.3, "PC-59": 58.4, "PAS-20": 96.9},
}


def load_metrics(folder: str | Path) -> dict:
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{folder} holds no metrics.json; run `dpseg eval --out {quote(str(folder))}` first")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err}); rerun the eval") from None


def _column(metrics: dict, label: str | None) -> str:
    s = metrics["settings"]
    if label:
        return label
    name = PAPER_COLUMNS.get(s.get("dataset_name"), s.get("dataset_name", "?"))
    return f"{name} ({s['classes']})" if s.get("classes") not in (None, "", "all") else name


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _miou(metrics: dict, p: str):
    return metrics["passes"].get(p, {}).get("miou")


def table1(runs: list[tuple[str, dict]]) -> str:
    """Columns: the paper's five benchmarks, then every other evaluated column."""
    ours = {label: m for label, m in runs}
    cols = list(PAPER_COLUMNS.values()) + [c for c in ours if c not in PAPER_COLUMNS.values()]
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in PAPER.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    for p, title in (("1", "ours pass I"), ("2", "ours pass II")):
        lines.append(f"| {title} | " + " | ".join(_fmt(_miou(ours[c], p)) if c in ours else "–" for c in cols) + " |")
    chance = [ours[c]["passes"][min(ours[c]["passes"])]["uniform_random_miou"] if c in ours else None for c in cols]
    lines.append("| uniform random (ours) | " + " | ".join(_fmt(v) for v in chance) + " |")
    return "\n".join(lines)


def table5(runs: list[tuple[str, dict]]) -> str:
    """One row per bank (generator and folder), pass I / pass II / gain per evaluated column."""
    cols = list(dict.fromkeys(label for label, _ in runs))
    banks: dict[str, dict[str, dict]] = {}
    for label, m in runs:
        s = m["settings"]
        banks.setdefault(f"{s.get('bank_generator', '?')} ({Path(s['bank']).name})", {})[label] = m
    head = " | ".join(f"{c} I | {c} II | Δ" for c in cols)
    lines = [f"| bank | {head} |", "|---|" + "---|" * (3 * len(cols))]
    for bank, by_col in banks.items():
        cells = []
        for c in cols:
            m = by_col.get(c)
            one, two = (_miou(m, "1"), _miou(m, "2")) if m else (None, None)
            gain = None if one is None or two is None else two - one
            cells += [_fmt(one), _fmt(two), "–" if gain is None else f"{gain:+.1f}"]
        lines.append(f"| {bank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def change_table(runs: list[tuple[str, dict]]) -> str:
    """Per run: pass II - pass I with its paired-bootstrap 95% interval over images and, where
    the eval ran it, the oracle-crop diagnostic and the share of its gain pass II closes."""
    lines = [
        "| run | images | pass I | pass II | II - I | 95% interval "
        "| diagnostic: oracle pass II | share of oracle gain closed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, m in runs:
        one, two = _miou(m, "1"), _miou(m, "2")
        gain = None if one is None or two is None else two - one
        boot = m.get("paired_bootstrap")
        interval = f"[{boot['ci95'][0]:+.1f}, {boot['ci95'][1]:+.1f}]" if boot and boot.get("ci95") else "–"
        diag = m.get("diagnostics", {})
        oracle = _fmt(diag["pass2_oracle"]["miou"]) if "pass2_oracle" in diag else "–"
        share = diag.get("share_of_oracle_gain_closed")
        lines.append(
            f"| {label} | {m['images']} | {_fmt(one)} | {_fmt(two)} | {'–' if gain is None else f'{gain:+.1f}'} | "
            f"{interval} | {oracle} | {'–' if share is None else f'{100 * share:.0f}%'} |"
        )
    return "\n".join(lines)


def settings_table(runs: list[tuple[str, dict]]) -> str:
    lines = [
        "| run | dataset | split | classes | images | checkpoint | encoder | bank | passes | min_area | crop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in runs:
        s = m["settings"]
        r = s.get("refinement", {})
        lines.append(
            f"| {label} | {s.get('dataset_name')} | {s.get('split')} | {s.get('classes') or 'all'} | "
            f"{m['images']} | {s.get('checkpoint')} | {s.get('encoder')} | {s.get('bank')} | "
            f"{','.join(str(p) for p in s.get('passes_run', []))} | {r.get('min_area')} | {r.get('crop')} |"
        )
    return "\n".join(lines)


def panels_for(folder: str | Path, metrics: dict, out: Path, k: int, run_label: str) -> list[Path]:
    """image | ground truth | pass I | pass II for the first k images with saved predictions."""
    from dpseg.data.readers import SegmentationDataset
    from dpseg.data.subsets import remap_labels
    from pipeline.evaluate.panels import blend, colourise, legend_for, palette, save_panels

    s = metrics["settings"]
    passes = [p for p in ("1", "2") if (Path(folder) / "pred" / f"pass{p}").is_dir()]
    if not passes or k == 0:
        return []
    try:
        dataset = SegmentationDataset(s["dataset"], s["split"])
    except UserError:
        return []  # the dataset moved: tables still render
    keep, names = metrics["class_ids"], metrics["class_names"]
    index_of = np.full(max(dataset.num_classes, 1) + 1, -1, np.int64)  # dataset id -> evaluated class index
    index_of[np.asarray(keep)] = np.arange(len(keep))
    colours = palette(len(names))
    made = []
    for i in range(min(k, metrics["images"], len(dataset))):
        image, label = dataset.load(i)
        image_id = dataset.ids[i]
        gt = remap_labels(label, keep, dataset.num_classes, dataset.ignore_index)
        gt = np.where(gt == dataset.ignore_index, -1, gt)
        maps = [gt]
        tiles = [("image", image), ("ground truth", colourise(gt, colours))]
        for p in passes:
            path = Path(folder) / "pred" / f"pass{p}" / f"{image_id}.png"
            if not path.is_file():
                break
            from PIL import Image

            pred = index_of[np.clip(np.asarray(Image.open(path)).astype(np.int64), 0, len(index_of) - 1)]
            maps.append(pred)
            tiles.append((f"pass {'I' * int(p)}", blend(image, pred, colours, alpha=1.0)))
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in run_label)
        made.append(save_panels(out / "panels" / f"{safe}-{image_id}.png", tiles, legend_for(maps, names, colours)))
    return made


def render_report(
    dirs: list[str],
    labels: list[str] | None = None,
    out: str = "out/report",
    panels: int = 4,
    title: str = "DPSeg evaluation",
) -> dict:
    if labels is not None and len(labels) != len(dirs):
        raise UserError(f"--labels gives {len(labels)} labels for {len(dirs)} folders; give one per folder")
    metrics = [load_metrics(d) for d in dirs]
    runs = [(_column(m, labels[i] if labels else None), m) for i, m in enumerate(metrics)]
    if len({label for label, _ in runs}) != len(runs):
        runs = [(f"{label} [{Path(d).name}]", m) for (label, m), d in zip(runs, dirs, strict=True)]
    out_dir = Path(out)
    made = [p for d, (label, m) in zip(dirs, runs, strict=True) for p in panels_for(d, m, out_dir, panels, label)]
    parts = [
        f"# {title}",
        "",
        "## Table 1 form: mIoU per benchmark, pass I and pass II",
        "",
        table1(runs),
        "",
        "## Table 5 form: one row per bank",
        "",
        table5(runs),
        "",
        "## Pass II - pass I, with its paired-bootstrap 95% interval over images",
        "",
        "The oracle columns are a diagnostic (pass II with crops cut from the ground truth), not a result.",
        "",
        change_table(runs),
        "",
        "## Settings",
        "",
        settings_table(runs),
        "",
    ]
    if made:
        parts += ["## Panels (image | ground truth | pass I | pass II)", ""]
        parts += [f"![{p.stem}](panels/{p.name})" for p in made] + [""]
    markdown = "\n".join(parts)
    path = out_dir / "report.md"
    atomic_write_bytes(path, markdown.encode())
    return {"markdown": markdown, "path": str(path), "panels": [str(p) for p in made]}
