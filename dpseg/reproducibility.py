"""Bit-identical reruns on the CPU: the same commit, params and thread count give the same bytes.

Three things decide it (measured on the demo's CLIP pretraining, docs/pipeline.md):
- the thread count: float sums are split across threads, so 1 and 2 threads give other bits;
- torch's deterministic mode: without it, some multi-threaded CPU kernels (the accumulating
  index_put_ behind the backward of advanced indexing) add in a different order on every run;
- seeds that never come from the clock or the process: DataLoader workers are seeded from the
  run's seed (`loader_seeding`).

`environment()` is what every stage records next to its outputs.
"""

from __future__ import annotations

import os
import platform
import random
import warnings
from importlib import metadata

import numpy as np
import torch

LIBRARIES = ("torch", "numpy", "open_clip_torch", "timm")


def set_threads(threads: int | None) -> None:
    """Intra-op and inter-op CPU threads for torch (None or 0: leave torch's default). torch lets
    the inter-op count be set once per process, before any parallel work: later calls keep it."""
    if not threads:
        return
    if threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
    torch.set_num_threads(int(threads))
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(int(threads))
        except RuntimeError:  # already fixed in this process (it only schedules, never sums)
            pass


def deterministic(enabled: bool = True) -> None:
    """torch's deterministic algorithms wherever torch has them; ops with no deterministic
    version (some CUDA backward kernels, docs/pipeline.md) warn instead of failing. On a GPU,
    cuBLAS also needs a fixed workspace, which must be set before its first use."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    # deterministic mode also fills every new tensor with NaN (to expose reads of uninitialised
    # memory): measured 7x slower CLIP pretraining steps on the CPU, and no kernel here reads such memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = enabled
    if enabled:  # benchmark mode picks kernels by timing them: another run may pick others
        torch.backends.cudnn.benchmark = False
        # the warn_only notices would repeat every step
        warnings.filterwarnings("once", message=".*does not have a deterministic implementation.*")


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy and `random` seeded from the worker's torch seed (which the
    loader derives from its seeded generator and the worker id), never from the process."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def loader_seeding(seed: int) -> dict:
    """DataLoader keyword arguments that seed every worker from `seed`."""
    return {"generator": torch.Generator().manual_seed(int(seed)), "worker_init_fn": seed_worker}


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # the build tag (+cpu, +cu130) matters for the bits
    return out


def environment() -> dict:
    """What a stage's numbers depend on besides its params: thread counts, determinism, versions."""
    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "python": platform.python_version(),
        **library_versions(),
    }
