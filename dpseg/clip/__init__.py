"""CLIP towers (open_clip ConvNeXt), chosen by registered encoder name."""

from dpseg.clip.encoders import ENCODERS, ClipTowers, EncoderSpec, WeightsError, load_clip
from dpseg.clip.image import ImageFeatures, ImageTower, PromptFeatures
from dpseg.clip.templates import NUM_TEMPLATES, TEMPLATES, split_synonyms
from dpseg.clip.text import TextTower

__all__ = [
    "ENCODERS",
    "EncoderSpec",
    "WeightsError",
    "load_clip",
    "ClipTowers",
    "ImageFeatures",
    "ImageTower",
    "PromptFeatures",
    "TEMPLATES",
    "NUM_TEMPLATES",
    "split_synonyms",
    "TextTower",
]
