"""Self-describing checkpoints: `model.safetensors` beside `config.json` (the resolved model
config with its version, the encoder and where its weights came from).

By default only what training changes is stored (the image tower, the decoder, and buffers):
the frozen prompt and text towers are rebuilt on load from the recorded encoder weights (an
open_clip tag, a `.safetensors` file, or "random" = built under torch.manual_seed(0)) and checked
against the id recorded at save time, so a checkpoint is ~1/3 the size and can never silently
pair a decoder with other prompt towers. `trainable_only=False` stores every tower.

Weights from a local file travel with the checkpoint: the file is copied into it as
`encoder.safetensors` (hard-linked from the previous checkpoint of a run when the bytes are the
same), and config.json records that name, relative to the checkpoint folder, with the file's
sha256 and where it came from. A checkpoint then loads from any path, on any machine; weights
named by an open_clip tag stay a tag (anyone can fetch them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import dpseg
from dpseg.errors import UserError, first_line
from dpseg.io import atomic_write_bytes, copy_file, current_umask, renamed, save_tensors
from dpseg.model.config import CONFIG_VERSION, DPSegConfig
from dpseg.model.network import DPSeg, build_dpseg

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ENCODER_FILE = "encoder.safetensors"  # a local weights file, carried in the checkpoint
FORMAT = "dpseg-checkpoint-1"
FROZEN_TOWERS = ("prompt_encoder", "text_encoder")  # rebuilt from the encoder weights on load


def frozen_towers_id(model: DPSeg) -> str:
    """A digest of the frozen towers' tensors (names, shapes, dtypes, values)."""
    digest = hashlib.blake2b(digest_size=16)
    for tower in FROZEN_TOWERS:
        for name, tensor in sorted(getattr(model, tower).state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{tower}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _is_frozen_key(key: str) -> bool:
    return key.split(".", 1)[0] in FROZEN_TOWERS


def save_dpseg(
    model: DPSeg,
    path: str | os.PathLike,
    extra: dict | None = None,
    trainable_only: bool = True,
    reuse: str | os.PathLike | None = None,
) -> Path:
    """Writes the checkpoint folder atomically (a reader never sees half of one). `reuse`: a
    checkpoint folder whose carried weights file may be hard-linked instead of copied again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights, carried = model.weights, {}
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        if trainable_only and weights not in ("random",) and Path(weights).is_file():
            carried = {
                "encoder_weights_sha256": _carry_weights(Path(weights), tmp, reuse),
                "encoder_weights_source": str(Path(weights).resolve()),
            }
            weights = ENCODER_FILE
        state = {
            k: v.detach().contiguous().cpu()
            for k, v in model.state_dict().items()
            if not (trainable_only and _is_frozen_key(k))
        }
        save_tensors(tmp / WEIGHTS_FILE, state, metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "config_version": CONFIG_VERSION,
            "dpseg_version": dpseg.__version__,
            "model": model.cfg.to_dict(),
            "encoder": model.encoder_spec.to_dict(),
            "encoder_weights": weights,
            **carried,
            "stored": "trainable" if trainable_only else "all",
            "frozen_towers_id": frozen_towers_id(model),
            "extra": extra or {},
        }
        atomic_write_bytes(tmp / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a checkpoint is as readable as a plain folder
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # name the file as it will be called, not its temporary folder
        name = str(err.filename).replace(str(tmp), str(path), 1) if err.filename else str(path)
        raise renamed(err, name) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _carry_weights(source: Path, folder: Path, reuse: str | os.PathLike | None) -> str:
    """Puts the weights file into the checkpoint folder being written; returns its sha256."""
    from dpseg.clip.encoders import file_sha256

    digest = file_sha256(source)
    previous = Path(reuse) / ENCODER_FILE if reuse is not None else None
    if previous is not None and previous.is_file() and file_sha256(previous) == digest:
        try:
            os.link(previous, folder / ENCODER_FILE)
            return digest
        except OSError:
            pass  # a file system without hard links: copy
    copy_file(source, folder / ENCODER_FILE)
    return digest


def recorded_weights(path: str | os.PathLike, config: dict) -> str:
    """The encoder weights a checkpoint records, as a loadable id: a carried file as its path
    inside the checkpoint folder, anything else (a tag, "random", an older checkpoint's absolute
    path) as recorded."""
    recorded = str(config.get("encoder_weights"))
    if recorded == ENCODER_FILE or (not os.path.isabs(recorded) and recorded.endswith(".safetensors")):
        return str(Path(path) / recorded)
    return recorded


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not (config_file.is_file() and (path / WEIGHTS_FILE).is_file()):
        raise UserError(f"{path} is not a dpseg checkpoint (expected {CONFIG_FILE} and {WEIGHTS_FILE} in it)")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file} is not valid JSON ({first_line(err)}); the checkpoint is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else None
        raise UserError(f"{config_file} has format {got!r}; this dpseg reads {FORMAT!r}")
    version = config.get("config_version", 1)
    if version != CONFIG_VERSION:
        raise UserError(
            f"{path} was saved with model config version {version}; this dpseg builds config version {CONFIG_VERSION} "
            "(the network changed: retrain, or load it with the dpseg release that wrote it)"
        )
    return config


def load_dpseg(
    path: str | os.PathLike, device: str | torch.device = "cpu", encoder_weights: str | os.PathLike | None = None
) -> DPSeg:
    """Rebuilds the network from `config.json` and loads its weights strictly. For a
    trainable-only checkpoint the frozen towers come from `encoder_weights` (default: the
    recorded ones) and must match the recorded id."""
    path = Path(path)
    config = read_checkpoint_config(path)
    cfg = DPSegConfig.from_dict(config["model"])
    stored = config.get("stored", "all")
    recorded = recorded_weights(path, config)
    if stored == "all":
        model = build_dpseg(cfg, weights=None)  # every weight comes from the file
    else:
        source = str(encoder_weights) if encoder_weights is not None else recorded
        if source.endswith(".safetensors") and not Path(source).exists():
            raise UserError(
                f"checkpoint {path} was trained with the encoder weights file {source}, which does not exist "
                f"here; pass --encoder-weights FILE (the same weights, at any path)"
            )
        model = build_dpseg(cfg, weights=None if source == "random" else source)
        if frozen_towers_id(model) != config.get("frozen_towers_id"):
            raise UserError(
                f"the frozen towers rebuilt from {source!r} are not the ones {path} was trained with "
                f"(recorded weights {config.get('encoder_weights')!r}); pass --encoder-weights with the original "
                f"weights file"
            )
    try:
        state = load_file(path / WEIGHTS_FILE)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as err:
        raise UserError(f"could not load {path / WEIGHTS_FILE} ({first_line(err)})") from None
    missing = [k for k in missing if stored == "all" or not _is_frozen_key(k)]
    if missing or unexpected:
        raise UserError(f"could not load {path / WEIGHTS_FILE} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.weights = recorded
    return model.to(device)
