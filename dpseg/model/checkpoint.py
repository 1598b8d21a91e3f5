"""Self-describing checkpoints: `model.safetensors` (every tower and the decoder) beside
`config.json` (the resolved model config, the encoder and its weights' origin), so a checkpoint
says how it was made and loads without the original CLIP weights at hand."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import dpseg
from dpseg.errors import UserError, first_line
from dpseg.model.config import DPSegConfig
from dpseg.model.network import DPSeg, build_dpseg

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "dpseg-checkpoint-1"


def save_dpseg(model: DPSeg, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Writes the checkpoint folder atomically (a reader never sees half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
        config = {
            "format": FORMAT, "dpseg_version": dpseg.__version__, "model": model.cfg.to_dict(),
            "encoder": model.encoder_spec.to_dict(), "encoder_weights": model.weights, "extra": extra or {},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not (config_file.is_file() and (path / WEIGHTS_FILE).is_file()):
        raise UserError(f"{path} is not a dpseg checkpoint (expected {CONFIG_FILE} and {WEIGHTS_FILE} in it)")
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT:
        raise UserError(f"{config_file} has format {config.get('format')!r}; this dpseg reads {FORMAT!r}")
    return config


def load_dpseg(path: str | os.PathLike, device: str | torch.device = "cpu") -> DPSeg:
    config = read_checkpoint_config(path)
    model = build_dpseg(DPSegConfig.from_dict(config["model"]), weights=None)  # every weight comes from the file
    try:
        state = load_file(Path(path) / WEIGHTS_FILE)
        model.load_state_dict(state, strict=True)
    except Exception as err:
        reason = first_line(err)
        raise UserError(f"could not load {Path(path) / WEIGHTS_FILE} ({reason})") from None
    model.weights = config["encoder_weights"]
    return model.to(device)
