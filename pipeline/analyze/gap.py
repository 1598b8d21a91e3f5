"""`dpseg analyze gap`: how close text, visual and dual prompts sit to image embeddings (paper
§3.1, Fig. 1 and Fig. 2), measured on a bank, an encoder and a prepared dataset.

Definitions (docs/analyses.md):
- a *pair* is (image region, class): a class present in a dataset image with at least
  `min_area` (a fraction of the image) of its pixels;
- the *image embedding* of a pair is the masked crop of the class region — the bounding box of
  its ground-truth pixels, pixels outside the mask set to the CLIP mean colour, resized to the
  bank's encode size (the same crop as pass-II refinement, dpseg.refine.crop_masked) — encoded
  by the frozen prompt tower that encoded the bank, L2-normalised;
- its prompts are the class's M text prompts (text tower, the bank's M templates), its M bank
  visual prompts, and the M dual prompts E_m = normalise((t_m/|t_m| + v_m/|v_m|) / 2) (Eq. 1);
- similarity(pair, modality) = mean over the M templates of cos(image, prompt_m);
- centroid distance(modality) = || mean of the unit image embeddings - mean of the unit prompt
  embeddings || over all pairs (and templates): the modality gap of Liang et al. (2022). The
  paper reports 0.18 dual / 0.33 visual / 0.39 text without defining its distance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dpseg.errors import UserError

MODALITIES = ("text", "visual", "dual")
PAPER_CENTROID_DISTANCES = {"dual": 0.18, "visual": 0.33, "text": 0.39}  # paper §3.1


# ---- the statistics: a pure function of tensors ----------------------------------------------
def dual_prompts(text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Eq. 1 per template, renormalised: (..., M, D) x 2 -> (..., M, D) unit vectors."""
    return F.normalize(F.normalize(text, dim=-1) + F.normalize(visual, dim=-1), dim=-1)


def gap_statistics(images: torch.Tensor, text: torch.Tensor, visual: torch.Tensor) -> dict[str, Any]:
    """images (P, D), text and visual prompts of each pair's class (P, M, D) -> per-pair
    similarities and the summary of each modality (definitions in the module docstring)."""
    if (
        images.dim() != 2
        or text.shape != visual.shape
        or text.dim() != 3
        or text.shape[0] != images.shape[0]
        or text.shape[-1] != images.shape[-1]
    ):
        raise ValueError(
            f"need images (P, D) and prompts (P, M, D); got {tuple(images.shape)}, "
            f"{tuple(text.shape)}, {tuple(visual.shape)}"
        )
    x = F.normalize(images.double(), dim=-1)
    prompts = {"text": F.normalize(text.double(), dim=-1), "visual": F.normalize(visual.double(), dim=-1)}
    prompts["dual"] = dual_prompts(prompts["text"], prompts["visual"])
    image_centroid = x.mean(dim=0)
    similarity, summary = {}, {}
    for name in MODALITIES:
        p = prompts[name]
        sims = torch.einsum("pd,pmd->pm", x, p).mean(dim=1)
        similarity[name] = sims
        centroid = p.flatten(0, 1).mean(dim=0)
        summary[name] = {
            "mean_similarity": float(sims.mean()),
            "std_similarity": float(sims.std(unbiased=False)),
            "median_similarity": float(sims.median()),
            "min_similarity": float(sims.min()),
            "max_similarity": float(sims.max()),
            "centroid_distance": float((image_centroid - centroid).norm()),
            "centroid_cosine": float(F.cosine_similarity(image_centroid, centroid, dim=0)),
        }
    summary["visual_above_text"] = float((similarity["visual"] > similarity["text"]).double().mean())
    summary["dual_above_text"] = float((similarity["dual"] > similarity["text"]).double().mean())
    return {"pairs": int(x.shape[0]), "templates": int(text.shape[1]), "similarity": similarity, "summary": summary}


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, components (2, D), explained variance ratio (2,)) of the rows of `points`; each
    component's sign is fixed so its largest loading is positive (the same plot every run)."""
    mean = points.mean(axis=0)
    _, s, vt = np.linalg.svd(points - mean, full_matrices=False)
    components = vt[:2]
    components *= np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])[:, None]
    variance = s**2
    return mean, components, variance[:2] / max(variance.sum(), 1e-12)


# ---- the run: sample pairs, encode crops, measure, plot --------------------------------------
@dataclass
class GapSettings:
    bank: str
    encoder: str
    images: str  # a prepared dataset folder (dpseg data prepare / synth), or its name under out/data or data
    out: str
    encoder_weights: str | None = None  # None: the weights the bank's features were computed with
    split: str | None = None  # None: val if the dataset has it, else its first split
    classes: str | None = None  # subset name (seen/unseen/all), ids "0,3", or class names "cat, dog"
    samples: int = 200
    min_area: float = 0.01  # fraction of the image a class must cover to make a pair
    seed: int = 0
    encode_size: int | None = None  # None: the size the bank's prompts were encoded at (its only or default one)
    batch_size: int = 32
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def open_dataset(images: str, split: str | None):
    from dpseg.data.layout import META
    from dpseg.data.readers import SegmentationDataset

    root = Path(images)
    for where in (Path("out/data"), Path("data")):  # a dataset name: the pipeline's, or the usual, location
        if not (root / META).is_file() and (where / images / META).is_file():
            root = where / images
    if not (root / META).is_file():
        raise UserError(
            f"--images {images}: not a prepared dataset (no {META}); make one with `dpseg data synth --out "
            f"data/shapes` or `dpseg data prepare NAME --src RAW --out data/NAME`"
        )
    from dpseg.data.layout import read_layout

    splits = read_layout(root).splits
    split = split or ("val" if "val" in splits else next(iter(splits)))
    return SegmentationDataset(root, split)


def resolve_classes(dataset, classes: str | None) -> list[int]:
    """Dataset class ids: a declared subset, ids or a '+' union of them (dpseg.data.subsets), else comma-separated
    names matched against any synonym of the dataset's classes."""
    from dpseg.clip.templates import split_synonyms
    from dpseg.data.subsets import available_subsets, is_subset_expression, resolve_subset

    if is_subset_expression(dataset.info, classes):
        return resolve_subset(dataset.info, classes)
    index = {}
    for i, name in enumerate(dataset.class_names):
        for synonym in split_synonyms(name):
            index.setdefault(synonym.lower(), i)
    wanted = [p.strip() for p in classes.split(",") if p.strip()]
    unknown = [w for w in wanted if w.lower() not in index]
    if unknown:
        raise UserError(
            f"--classes: {', '.join(map(repr, unknown))} not in the vocabulary of {dataset.info.root} "
            f"({dataset.info.vocabulary}); give class names from it, a subset "
            f"({', '.join(available_subsets(dataset.info)) or 'none declared'}) or ids"
        )
    return list(dict.fromkeys(index[w.lower()] for w in wanted))


def sample_pairs(dataset, class_ids: list[int], samples: int, min_area: float, seed: int) -> list[tuple[int, int, int]]:
    """(item index, class id, area in pixels) for up to `samples` pairs: items in a seeded
    random order, each item's qualifying classes in id order."""
    wanted = set(class_ids)
    order = np.random.default_rng(seed).permutation(len(dataset))
    pairs: list[tuple[int, int, int]] = []
    for index in order:
        label = dataset.load(int(index))[1]
        areas = np.bincount(label[label != dataset.ignore_index].ravel(), minlength=dataset.num_classes)
        need = max(1, int(np.ceil(min_area * label.size)))
        for c in sorted(wanted):
            if c < len(areas) and areas[c] >= need:
                pairs.append((int(index), c, int(areas[c])))
                if len(pairs) == samples:
                    return pairs
    return pairs


def load_towers(encoder: str, info: dict, weights: str | None, device: str):
    """The CLIP towers the bank was encoded with (`info`: the bank's record of `encoder`). Given
    weights must be the recorded ones (same file, or the recorded digest when that file is gone)
    and are then what is loaded. Random towers are built under seed 0, as the bank's
    PromptEncoder builds them, so they are the same towers."""
    from dpseg.clip import load_clip
    from dpseg.clip.encoders import ENCODERS, matches_recorded, resolve_weights

    bank_weights = str(info["weights"])
    chosen = bank_weights
    if weights is not None:
        chosen = resolve_weights(ENCODERS.get(encoder), weights) or "random"
        if not matches_recorded(chosen, bank_weights, info.get("weights_sha256")):
            raise UserError(
                f"the bank's {encoder!r} prompts were encoded with weights {bank_weights!r}, "
                f"not {chosen!r}; omit --encoder-weights or pass {bank_weights}"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_clip(encoder, None if chosen == "random" else chosen, device)


@torch.no_grad()
def encode_crops(tower, dataset, pairs, size: int, batch_size: int, progress: bool) -> torch.Tensor:
    """The image embedding of every pair (module docstring): masked crop -> frozen tower."""
    from tqdm.auto import tqdm

    from dpseg.refine import crop_masked

    fill = tower.mean.view(3).cpu()
    out = []
    cache: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
    for start in tqdm(range(0, len(pairs), batch_size), desc="encode crops", unit="batch", disable=not progress):
        crops = []
        for index, c, _ in pairs[start : start + batch_size]:
            if index not in cache:
                cache.clear()  # pairs of one item are consecutive
                image, label = dataset.load(index)
                cache[index] = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255, label)
            image, label = cache[index]
            crops.append(crop_masked(image, torch.from_numpy(label == c), size, fill))
        device = tower.mean.device
        batch = torch.stack(crops).to(device)
        out.append(tower.encode_prompts(tower.normalize(batch)).embedding.float().cpu())
    return torch.cat(out)


def run_gap(settings: GapSettings, progress: bool = True) -> dict[str, Any]:
    from bank.reader import Bank
    from dpseg.clip.templates import templates as first_templates
    from pipeline.analyze import plots

    # 1. inputs: the bank (its encoder, weights, templates, encode size) and the dataset's pairs
    if settings.samples < 1:
        raise UserError(f"--samples must be at least 1, got {settings.samples}")
    bank = Bank(settings.bank)
    info = bank.encoder_info(settings.encoder)
    templates = int(bank.config["templates"])
    dataset = open_dataset(settings.images, settings.split)
    class_ids = resolve_classes(dataset, settings.classes)
    pairs = sample_pairs(dataset, class_ids, settings.samples, settings.min_area, settings.seed)
    if len(pairs) < 2:
        raise UserError(
            f"found {len(pairs)} (region, class) pairs in {dataset.info.root} ({dataset.split}); "
            f"lower --min-area (now {settings.min_area}) or choose other --classes"
        )
    used = sorted({c for _, c, _ in pairs})
    names = [dataset.class_names[c] for c in used]
    # 2. prompts of the classes that occur: text (the bank's templates), bank visual, dual
    towers = load_towers(settings.encoder, info, settings.encoder_weights, settings.device)
    size = int(settings.encode_size or bank.encode_size(settings.encoder))
    text = towers.text.encode_classes(names, first_templates(templates)).float().cpu()
    visual = bank.prototypes(names, settings.encoder, templates, encode_size=size).embedding.float().cpu()
    # 3. image embeddings of the pairs, then the statistics
    images = encode_crops(towers.prompt, dataset, pairs, size, settings.batch_size, progress)
    row = torch.tensor([used.index(c) for _, c, _ in pairs])
    stats = gap_statistics(images, text[row], visual[row])
    # 4. outputs: per-pair CSV, Fig. 2 histogram, Fig. 1 embedding plot, JSON summary
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    sims = {m: stats["similarity"][m].numpy() for m in MODALITIES}
    plots.write_csv(
        out / "pairs.csv",
        [
            {
                "item": dataset.ids[i],
                "class_id": c,
                "class": dataset.class_names[c],
                "area": a,
                **{f"sim_{m}": round(float(sims[m][k]), 6) for m in MODALITIES},
            }
            for k, (i, c, a) in enumerate(pairs)
        ],
    )
    files = {"pairs": str(out / "pairs.csv")}
    files["histogram"] = histogram(sims, out / "similarity_histogram.png", len(pairs))["figure"]
    files["embedding"] = embedding_plot(images, text, visual, row, names, out / "embedding_pca.png")["figure"]
    summary = {
        "settings": settings.to_dict(),
        "bank": {
            "root": str(bank.root),
            "generator": bank.generator,
            "encoder": settings.encoder,
            "weights": info["weights"],
            "templates": templates,
            "encode_size": size,
        },
        "dataset": {"root": str(dataset.info.root), "split": dataset.split, "vocabulary": dataset.info.vocabulary},
        "pairs": len(pairs),
        "classes": len(used),
        "templates": templates,
        "summary": stats["summary"],
        "centroid_distance": {m: stats["summary"][m]["centroid_distance"] for m in MODALITIES},
        "paper_centroid_distance": PAPER_CENTROID_DISTANCES,
        "definitions": DEFINITIONS,
        "files": files,
    }
    plots.atomic_write_json(out / "gap.json", plots.to_jsonable(summary))
    return summary


DEFINITIONS = {
    "image_embedding": "masked crop of the class's ground-truth region (bounding box, outside-mask pixels = CLIP mean "
    "colour) resized to the bank's encode size, encoded by the frozen prompt tower, L2-normalised",
    "dual_prompt": "normalise((t/|t| + v/|v|) / 2) per template (Eq. 1)",
    "similarity": "mean over the M templates of cos(image embedding, prompt)",
    "centroid_distance": "|| mean of unit image embeddings - mean of unit prompts (over pairs and templates) ||_2",
    "projection": "PCA (numpy SVD) of image embeddings and per-class template-mean prompts, fitted jointly",
}


def histogram(sims: dict[str, np.ndarray], path: Path, pairs: int) -> dict[str, str]:
    from pipeline.analyze import plots

    values = np.concatenate(list(sims.values()))
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo - 1e-6, hi + 1e-6, 31)
    counts = {m: np.histogram(v, bins=bins)[0].tolist() for m, v in sims.items()}
    fig = plots.histogram_figure(sims, bins, f"image-prompt cosine similarity ({pairs} pairs)", "cosine similarity")
    return plots.save_figure(
        fig, path, {"bin_edges": bins, "counts": counts, "mean": {m: float(v.mean()) for m, v in sims.items()}}
    )


def embedding_plot(images, text, visual, row, names, path: Path) -> dict[str, str]:
    from pipeline.analyze import plots

    x = F.normalize(images.double(), dim=-1)
    per_class = {"text": F.normalize(text.double(), dim=-1), "visual": F.normalize(visual.double(), dim=-1)}
    per_class["dual"] = dual_prompts(per_class["text"], per_class["visual"])
    class_points = {m: F.normalize(p.mean(dim=1), dim=-1) for m, p in per_class.items()}  # (N, D)
    stacked = torch.cat([x, *class_points.values()]).numpy()
    mean, components, ratio = pca_2d(stacked)
    project = lambda a: (np.asarray(a) - mean) @ components.T  # noqa: E731
    points = {"image": project(x.numpy()), **{m: project(p.numpy()) for m, p in class_points.items()}}
    # centroids as in gap_statistics: over pairs (and templates), not over classes
    centroids = {"image": project(x.mean(dim=0).numpy()[None])[0]}
    for m in MODALITIES:
        centroids[m] = project(per_class[m][row].flatten(0, 1).mean(dim=0).numpy()[None])[0]
    fig = plots.scatter_figure(
        points, centroids, "image embeddings and prompts (PCA)", (f"PC1 ({ratio[0]:.0%})", f"PC2 ({ratio[1]:.0%})")
    )
    return plots.save_figure(
        fig,
        path,
        {
            "projection": "pca",
            "explained_variance_ratio": ratio,
            "points": points,
            "centroids": centroids,
            "classes": names,
            "image_rows": row.tolist(),
        },
    )
