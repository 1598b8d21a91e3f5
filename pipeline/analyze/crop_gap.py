"""Are pass II's crop prompts outside the distribution of the bank's prompts? Ground-truth crops
of val scenes (cut as pass II cuts them: masked box at the model input, resized to the encode
size) through the frozen prompt tower, compared with the bank's prototypes of the same classes.

    python -m pipeline.analyze.crop_gap out/data/shapes out/bank out/clip/tiny.safetensors --images 200

Per scene style (the dataset's own scenes, and the same seeds re-rendered `plain` when the
dataset is the shapes world), over every (image, class) with at least 64 pixels at the input:
- crop -> own class: cosine between the crop's global embedding and its class's mean bank
  prototype; bank -> own class: the same for the bank's own prompts (the in-distribution level);
- nearest-prototype accuracy: the share of crops whose most similar class mean is their class
  (bank prompts: the same, leave-in), over the evaluated classes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def crop_gap(dataset: str, bank_dir: str, weights: str, images: int = 200, size: int = 96, seed_style: bool = True):
    from bank.reader import Bank
    from dpseg.clip import load_clip
    from dpseg.clip.image import PROMPT_STRIDES
    from dpseg.data import shapes
    from dpseg.data.readers import SegmentationDataset
    from dpseg.refine import crop_masked, label_maps

    ds = SegmentationDataset(dataset, "val")
    names = list(ds.info.class_names) if hasattr(ds.info, "class_names") else None
    from dpseg.data.vocab import load_vocab

    names = names or load_vocab(ds.info.vocabulary)
    bank = Bank(bank_dir)
    tower = load_clip("tiny", weights=weights).prompt
    protos = bank.prototypes(names, "tiny")
    encode_size = int(bank.encode_size("tiny"))
    means = F.normalize(F.normalize(protos.embedding, dim=-1).mean(1), dim=-1)  # (N, D)
    fill = tower.mean.view(3)
    settings = json.loads((Path(dataset) / "dataset.json").read_text()).get("settings", {})

    def scenes(style: str | None):
        for i in range(min(images, len(ds))):
            if style is None:
                image, label = ds.load(i)
            else:
                image, label = shapes.render_scene(
                    int(settings.get("size", 128)),
                    int(settings.get("seed", 0)),
                    f"val/{i}",
                    list(range(48)),
                    int(settings.get("max_objects", 4)),
                    ds.ignore_index,
                    48 if settings.get("background") else None,
                    style,
                )
            yield image, label

    def measure(style: str | None) -> dict:
        sims, hits, crops = [], [], []
        classes = []
        for image, label in scenes(style):
            img = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            lab = label_maps(
                torch.from_numpy(np.asarray(label).astype(np.int64))[None], len(names), ds.ignore_index, (size, size)
            )[0]
            for c in torch.unique(lab).tolist():
                mask = lab == c
                if c >= len(names) or int(mask.sum()) < 64:
                    continue
                crops.append(crop_masked(img, mask, encode_size, fill))
                classes.append(c)
        emb = []
        with torch.no_grad():
            for k in range(0, len(crops), 64):
                batch = torch.stack(crops[k : k + 64])
                emb.append(tower.encode_prompts(tower.normalize(batch), PROMPT_STRIDES).embedding)
        emb = F.normalize(torch.cat(emb), dim=-1)
        cls = torch.tensor(classes)
        scores = emb @ means.T
        sims = scores[torch.arange(len(cls)), cls]
        hits = scores.argmax(1) == cls
        return {
            "crops": len(cls),
            "cos_to_own_class": float(sims.mean()),
            "nearest_prototype_accuracy": float(hits.float().mean()),
        }

    bank_emb = F.normalize(protos.embedding, dim=-1)  # (N, M, D)
    bank_scores = torch.einsum("nmd,kd->nmk", bank_emb, means)
    n = len(names)
    own = bank_scores[torch.arange(n), :, torch.arange(n)]
    result = {
        "bank": {
            "prompts": int(n * bank_emb.shape[1]),
            "cos_to_own_class": float(own.mean()),
            "nearest_prototype_accuracy": float((bank_scores.argmax(-1) == torch.arange(n)[:, None]).float().mean()),
        },
        "crops, dataset scenes": measure(None),
    }
    if seed_style and settings.get("scene_style") == "photo":
        result["crops, same seeds plain"] = measure("plain")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("dataset")
    p.add_argument("bank")
    p.add_argument("weights")
    p.add_argument("--images", type=int, default=200)
    a = p.parse_args()
    print(json.dumps(crop_gap(a.dataset, a.bank, a.weights, a.images), indent=2))
