"""Training checkpoints: the model (via `save_dpseg`) plus everything a resumed run needs to
continue exactly where the killed one stopped, in safe formats only.

    OUT/checkpoint/
      model.safetensors, config.json      save_dpseg (trainable weights; config.json.extra = run record)
      optimizer.safetensors               AdamW moments per parameter index
      optimizer.json                      AdamW param groups (lr, betas, ...) and scheduler state
      rng-rank<r>.safetensors             each rank's torch (and CUDA) RNG state
      state.json                          step, data position, elapsed seconds; written last

A checkpoint is written into OUT/.checkpoint-new and swapped in by two renames (the old one
goes to OUT/.checkpoint-old first, and is deleted after). A process killed at any point
leaves either OUT/checkpoint or one of the two staging folders complete; `recover` puts the
newest complete one back in place before a run resumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dpseg.errors import UserError, first_line
from dpseg.io import atomic_write_json, renamed, save_tensors

CHECKPOINT = "checkpoint"
NEW, OLD = ".checkpoint-new", ".checkpoint-old"
STATE_FILE = "state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def is_complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def recover(out: Path) -> Path | None:
    """Finishes or undoes a swap that a kill interrupted; returns the checkpoint folder, or None
    when the run has none yet."""
    target, new, old = out / CHECKPOINT, out / NEW, out / OLD
    if not is_complete(target):
        for candidate in (new, old):  # the newest complete one wins
            if is_complete(candidate):
                if target.exists():
                    shutil.rmtree(target)
                candidate.rename(target)
                break
    for leftover in (new, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    return target if is_complete(target) else None


# ---- optimizer and RNG as tensors + JSON ----------------------------------------------------


def optimizer_payload(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, fields in state["state"].items():
        for field, value in fields.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{index}.{field}"] = value.detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> dict:
    """Restores the optimizer from `folder`; returns the rest of optimizer.json (scheduler)."""
    tensors = load_file(folder / OPTIMIZER_TENSORS)
    meta = json.loads((folder / OPTIMIZER_JSON).read_text())
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return meta


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(folder: Path, rank: int) -> bool:
    path = folder / rng_file(rank)
    if not path.is_file():  # resumed on more ranks than were saved: the new ones keep their seeds
        return False
    tensors = load_file(path)
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    return True


# ---- save / read ------------------------------------------------------------------------------


def save_checkpoint(out: Path, model, optimizer, scheduler, state: dict, extra: dict, accelerator) -> Path:
    """Collective: every rank calls it (each adds its own RNG file); the main rank writes the rest
    and swaps the folder in. `model` is the unwrapped network."""
    from dpseg.model.checkpoint import save_dpseg

    staging = out / NEW
    failed = None
    try:
        if accelerator.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            save_dpseg(model, staging, extra=extra, trainable_only=True, reuse=out / CHECKPOINT)
            tensors, meta = optimizer_payload(optimizer)
            save_tensors(staging / OPTIMIZER_TENSORS, tensors)
            atomic_write_json(staging / OPTIMIZER_JSON, {**meta, "scheduler": scheduler.state_dict()})
    except OSError as err:  # a full disk, a quota, a file-size limit: every rank stops at the barrier below
        failed = err
    failed = _first_failure(failed, accelerator)
    if failed is None:
        try:
            save_tensors(staging / rng_file(accelerator.process_index), rng_tensors())
        except OSError as err:
            failed = err
        failed = _first_failure(failed, accelerator)
    if failed is not None:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # the last complete checkpoint stays the one to resume
        name = str(failed.filename or staging).replace(str(staging), str(out / CHECKPOINT), 1)
        raise renamed(failed, name) from None
    if accelerator.is_main_process:
        atomic_write_json(staging / STATE_FILE, state)  # the folder is complete from here on
        crash_point("swap")
        target, old = out / CHECKPOINT, out / OLD
        if target.exists():
            target.rename(old)
        crash_point("between")
        staging.rename(target)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return out / CHECKPOINT


def _first_failure(failed: OSError | None, accelerator) -> OSError | None:
    """A write error on any rank, known to every rank (so none waits at a barrier for a rank that
    stopped); the barrier of a plain save otherwise."""
    if accelerator.num_processes == 1:
        return failed
    from accelerate.utils import gather_object

    errors = [e for e in gather_object([failed]) if e is not None]
    if not errors:
        return None
    first = errors[0]
    return failed or OSError(first.errno, first.strerror, first.filename)


def weights_sha256(folder: Path) -> str | None:
    """The digest of the local weights file a checkpoint was trained with (None: a tag, random)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("encoder_weights_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise damaged(folder, err) from None


def damaged(folder: Path, err: BaseException) -> UserError:
    return UserError(
        f"checkpoint {folder} is damaged ({first_line(err)}); delete it to start again "
        f"(or pass --resume no to overwrite the run)"
    )


def load_checkpoint_model(folder: Path, device):
    from dpseg.model.checkpoint import load_dpseg

    try:
        return load_dpseg(folder, device)
    except UserError as err:
        raise damaged(folder, err) from None


def safe_restore(folder: Path, optimizer, rank: int) -> dict:
    try:
        meta = load_optimizer(optimizer, folder)
        restore_rng(folder, rank)
        return meta
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise damaged(folder, err) from None


def crash_point(name: str) -> None:
    """Fault injection for the resume tests: DPSEG_TRAIN_CRASH=name:n (points: step = after an
    optimizer step, swap / between = inside a checkpoint's swap)."""
    from dpseg.faults import crash_point as inject

    inject("DPSEG_TRAIN_CRASH", name)
