"""The 80 CLIP ImageNet prompt templates (open_clip ships them) and class-name helpers."""

from __future__ import annotations

import unicodedata

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

# open_clip stores them as callables; we want the format strings ("a bad photo of a {}.")
TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
NUM_TEMPLATES = len(TEMPLATES)
assert NUM_TEMPLATES == 80, "open_clip changed its ImageNet template list"


def split_synonyms(class_name: str) -> list[str]:
    """'building, edifice' -> ['building', 'edifice'] (the public lists join synonyms by ', ')."""
    # NFC: a name typed with combining accents is the same category (and bank entry) as its precomposed form
    names = [part.strip() for part in unicodedata.normalize("NFC", class_name).split(",")]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"empty class name: {class_name!r}")
    return names


def primary_name(class_name: str) -> str:
    """The first synonym: what a generator is prompted with."""
    return split_synonyms(class_name)[0]


def templates(count: int | None = None) -> tuple[str, ...]:
    """The first `count` templates (paper Table 4 uses 1/10/20/40/80)."""
    if count is None:
        return TEMPLATES
    if not 1 <= count <= NUM_TEMPLATES:
        raise ValueError(f"templates must be between 1 and {NUM_TEMPLATES}, got {count}")
    return TEMPLATES[:count]
