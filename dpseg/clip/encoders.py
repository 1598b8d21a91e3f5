"""Encoder registry and weight loading.

An encoder name (`convnext-b`, `convnext-l`, `tiny`) fixes the open_clip architecture, the
default pretrained tag and the input sizes. Weights come from the hub tag by default (open_clip
downloads the tag's file; a `.bin` there goes through torch.load(weights_only=True)), or from a
local `.safetensors` file or a folder holding one (other local formats are refused), or are
random when asked (`weights=None`, built under torch.manual_seed(0)).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch

from dpseg.clip.image import ImageTower
from dpseg.clip.text import TextTower
from dpseg.errors import UserError, first_line
from dpseg.registry import Registry

_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    open_clip_model: str
    pretrained_tag: str | None
    image_size: int  # segmentation input (SED: 768); prompt images are encoded at this size too (paper §5.2)
    prompt_size: int  # the tower's native CLIP resolution: the prompt-size ablation value
    drop_path: float = 0.0  # image-tower stochastic depth as SED trains it (its vendored open_clip configs)
    head_dropout: float = 0.0  # image-tower head dropout as SED trains it

    def to_dict(self) -> dict:
        return asdict(self)


ENCODERS: Registry[EncoderSpec] = Registry("encoder")
ENCODERS.register("convnext-b", EncoderSpec("convnext-b", "convnext_base_w_320", "laion_aesthetic_s13b_b82k", 768, 320))
# SED's open_clip copy sets no drop for convnext_base_w_320 (upstream open_clip now says drop_path 0.1)
# and timm_drop 0.1 / timm_drop_path 0.1 for convnext_large_d_320: set here, never inherited.
ENCODERS.register(
    "convnext-l",
    EncoderSpec(
        "convnext-l", "convnext_large_d_320", "laion2b_s29b_b131k_ft_soup", 768, 320, drop_path=0.1, head_dropout=0.1
    ),
)
# A small ResNet CLIP (timm's 0.4M-parameter `test_resnet` trunk) built from a config shipped in this
# package: tests and the demo (which pretrains it). Not ConvNeXt-atto: from scratch on the shapes world
# it never learnt texture; not resnet10t: 3x the CPU step for less zero-shot accuracy per minute (docs/clip.md).
ENCODERS.register("tiny", EncoderSpec("tiny", "dpseg-tiny-resnet", None, 128, 64))

DEFAULT_WEIGHTS = "default"
WEIGHT_FILE_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors")


@contextlib.contextmanager
def _quiet_logging():
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class WeightsError(UserError):
    """Weights that cannot be found or loaded; the message says what to pass instead."""


@dataclass
class ClipTowers:
    """The three towers DPSeg uses. `image` is the one that is fine-tuned; `prompt` is a frozen
    copy of it (encodes generated images and pass-II crops); `text` is frozen."""

    spec: EncoderSpec
    weights: str  # what the weights were resolved from: a tag, a file, or "random"
    image: ImageTower
    prompt: ImageTower
    text: TextTower


def resolve_weights(spec: EncoderSpec, weights: str | os.PathLike | None) -> str | None:
    """Returns the `pretrained=` value for open_clip: a tag, a file path, or None (random)."""
    if weights is None or str(weights).lower() in ("none", "random"):
        return None
    if str(weights) == DEFAULT_WEIGHTS:
        if spec.pretrained_tag is None:
            return None
        return spec.pretrained_tag
    path = Path(weights)
    if path.is_file():
        if path.suffix != ".safetensors":  # a pickle can run code: local files must be safetensors
            raise WeightsError(
                f"weights file {path} is not .safetensors; convert it once with safetensors.torch.save_file("
                f"torch.load(path, weights_only=True), 'open_clip_model.safetensors') and pass that file"
            )
        return str(path)
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return str(path / name)
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return str(found[0])
        raise WeightsError(
            f"no weights file in {path}: expected one of {', '.join(WEIGHT_FILE_NAMES)} "
            f"(safetensors; pickled checkpoints are not loaded)"
        )
    tags = open_clip.list_pretrained_tags_by_model(spec.open_clip_model)
    if str(weights) in tags:
        return str(weights)
    raise WeightsError(
        f"weights {str(weights)!r} for encoder {spec.name!r} are neither a file, a directory, "
        f"nor an open_clip tag ({', '.join(tags) or 'none'}); pass a path, a tag, or 'none' for random init"
    )


def create_open_clip(
    spec: EncoderSpec, weights: str | os.PathLike | None = DEFAULT_WEIGHTS, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, str]:
    """Builds the open_clip model and loads its weights; returns (model, weights id)."""
    pretrained = resolve_weights(spec, weights)

    try:
        with _quiet_logging():  # "initialized randomly" is what we asked for; failures are re-raised below
            model = open_clip.create_model(
                spec.open_clip_model, pretrained=pretrained, device=device, weights_only=True
            )
    except Exception as err:  # open_clip raises RuntimeError/OSError/HF errors alike
        if pretrained is None:
            raise
        reason = first_line(err)
        what = (
            f"weights file {pretrained}"
            if Path(pretrained).is_file()
            else f"open_clip pretrained tag {pretrained!r} (a published-weights name, not a file)"
        )
        hint = (
            "pass --encoder-weights /path/to/open_clip_model.safetensors (or its folder), "
            "or --encoder-weights none for random init"
        )
        raise WeightsError(f"could not load the {what} for encoder {spec.name!r} ({reason}); {hint}") from None
    return model, "random" if pretrained is None else pretrained


def load_clip(
    name: str, weights: str | os.PathLike | None = DEFAULT_WEIGHTS, device: str | torch.device = "cpu"
) -> ClipTowers:
    """Builds the image, prompt and text towers of encoder `name`.

    Random towers ("random" / None) are built under torch.manual_seed(0) whatever the caller's
    seed, so every process (bank encoder, trainer, checkpoint loader) rebuilds the same towers;
    the caller's RNG state is left untouched."""
    spec = ENCODERS.get(name)
    with torch.random.fork_rng(devices=[]):
        if resolve_weights(spec, weights) is None:
            torch.manual_seed(0)
        model, weights_id = create_open_clip(spec, weights, device)
    visual = model.visual
    prompt_visual = copy.deepcopy(visual)
    del model.visual  # the text tower keeps the rest of the CLIP model
    image = ImageTower(visual, image_size=spec.image_size).set_regularization(spec.drop_path, spec.head_dropout)
    # Prompt images are encoded at the segmenter's input size (paper §5.2: generated at 768x768,
    # "matching the input image size"), so Eq. 2's pooled features describe the scale they meet.
    prompt = ImageTower(prompt_visual, image_size=spec.image_size).set_regularization(0.0, 0.0).freeze()
    text = TextTower(model, open_clip.get_tokenizer(spec.open_clip_model)).freeze()
    return ClipTowers(spec=spec, weights=weights_id, image=image, prompt=prompt, text=text)


def encoder_dims(name: str) -> tuple[int, dict[int, int]]:
    """(embed_dim, {stride: channels}) of an encoder, read from the architecture built on the
    meta device (no memory, no weights)."""
    with torch.device("meta"):
        towers = load_clip(name, weights=None, device="meta")
    tower = towers.image
    return tower.embed_dim, dict(zip(tower.strides, tower.channels, strict=False))


def same_weights(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two weight identifiers (tags, "random", local files) name the same weights: equal
    strings, two local files with equal bytes, or two safetensors files holding equal tensors. A
    file copied elsewhere (a `dvc exp run --temp` workspace, another machine's checkout) is the
    same weights under another path; so is the demo CLIP trained again at another commit, whose
    metadata records that commit but whose tensors are the same."""
    if str(a) == str(b):
        return True
    paths = [Path(str(x)) for x in (a, b)]
    if not all(p.is_file() for p in paths):
        return False
    if paths[0].stat().st_size == paths[1].stat().st_size and file_sha256(paths[0]) == file_sha256(paths[1]):
        return True
    return all(p.suffix == ".safetensors" for p in paths) and same_tensors(*paths)


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensors (names, dtypes, shapes, values),
    whatever their metadata says; False for a file that is not a readable safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(a), "pt") as left, safe_open(str(b), "pt") as right:
            if set(left.keys()) != set(right.keys()):
                return False
            for name in left.keys():
                x, y = left.get_tensor(name), right.get_tensor(name)
                if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                    return False
            return True
    except (SafetensorError, OSError, ValueError):
        return False


def matches_recorded(
    given: str | os.PathLike | None, recorded: str | os.PathLike | None, recorded_sha256: str | None = None
) -> bool:
    """Whether `given` weights are the ones a bank recorded as (`recorded` path, its sha256). When
    the recorded file is gone (a bank restored from DVC's run cache records the temporary
    workspace of the run that built it; a bank copied to another machine, its old path), the
    recorded digest decides."""
    if same_weights(given, recorded):
        return True
    path = Path(str(given))
    return (
        bool(recorded_sha256)
        and not Path(str(recorded)).exists()
        and path.is_file()
        and file_sha256(path) == recorded_sha256
    )


def weights_digest(weights: str | os.PathLike | None) -> str | None:
    """sha256 of a local weights file (recorded beside its path), None for tags and "random"."""
    path = Path(str(weights))
    return file_sha256(path) if weights is not None and path.is_file() else None


_file_hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: hash a big file once per process


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]
