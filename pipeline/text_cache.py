"""Text prompts computed once and kept on disk: (class names x templates) through the frozen
text tower of an encoder is the same tensor for every run that shares (encoder, weights,
templates, class names), so training and evaluation read it instead of recomputing it.

    text = cached_text_embeddings(model, class_names)          # (N, M, D) float32
    # -> $DPSEG_CACHE/text/<encoder>-<key>.safetensors  (default ~/.cache/dpseg)

The key hashes what the tensor depends on: the encoder id, the weights' identity (a weights
file by its bytes, an open_clip tag by name, random towers by their parameters), the template
strings and the class names. A cache file is written atomically, so a killed run never leaves
half of one behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from dpseg.clip.encoders import file_sha256
from dpseg.clip.templates import templates as first_templates
from dpseg.io import atomic_write_bytes

CACHE_ENV = "DPSEG_CACHE"
FORMAT = "dpseg-text-cache-1"  # bump when the text computation itself changes


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $DPSEG_CACHE, else ~/.cache/dpseg."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dpseg")


def weights_identity(weights: str, text_tower: torch.nn.Module | None = None) -> str:
    """What makes two towers' weights the same: a file's bytes, a tag's name, or (random init,
    which depends on the seed it was built under) the text tower's own parameters."""
    if weights != "random" and Path(weights).is_file():
        return f"sha256:{file_sha256(weights)}"
    if weights == "random" and text_tower is not None:
        digest = hashlib.sha256()
        for name, value in sorted(text_tower.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
        return f"params:{digest.hexdigest()}"
    return f"tag:{weights}"


def cache_key(encoder: str, weights_id: str, templates: tuple[str, ...], class_names: list[str]) -> str:
    payload = json.dumps(
        {
            "format": FORMAT,
            "encoder": encoder,
            "weights": weights_id,
            "templates": list(templates),
            "classes": list(class_names),
        },
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cached_text_embeddings(
    model, class_names: list[str], cache_dir: str | os.PathLike | None = None, templates: int | None = None
) -> torch.Tensor:
    """(N, M, D) float32 text prompts of `model` (a DPSeg: its frozen text tower, encoder and
    weights) for `class_names` with the first `templates` templates (default: the model's),
    on the text tower's device; read from the cache when present, else computed and stored."""
    # 1. the identity of the tensor asked for
    count = templates if templates is not None else model.cfg.templates
    template_strings = first_templates(count)
    encoder = model.encoder_spec.name
    weights_id = weights_identity(str(model.weights), model.text_encoder)
    key = cache_key(encoder, weights_id, template_strings, list(class_names))
    path = cache_root(cache_dir) / "text" / f"{encoder}-{key}.safetensors"
    device = model.text_encoder.clip.text_projection.device
    # 2. a hit: a whole file (an unreadable one is recomputed and replaced)
    if path.is_file():
        try:
            tensor = load(path.read_bytes())["text"]
            if tensor.shape[:2] == (len(class_names), count):
                return tensor.to(device)
        except (SafetensorError, KeyError, OSError):
            pass
    # 3. a miss: compute with the frozen tower, store atomically
    tensor = model.text_encoder.encode_classes(list(class_names), template_strings).float().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "encoder": encoder,
        "weights": str(model.weights),
        "weights_id": weights_id,
        "templates": str(count),
        "classes": json.dumps(list(class_names), ensure_ascii=False),
    }
    atomic_write_bytes(path, save({"text": tensor}, metadata=metadata))
    return tensor.to(device)
