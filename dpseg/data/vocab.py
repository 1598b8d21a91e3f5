"""Vocabularies: the class names of a dataset, in label order, synonyms joined by ", ".

The six public lists are stored as JSON in `vocabularies/` exactly as SED/CAT-Seg publish
them (including their odd spacing, e.g. "bed "), because text embeddings and reported
numbers must match the anchor code; `dpseg.clip.templates.primary_name` strips names.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dpseg.errors import UserError
from dpseg.registry import Registry, UnknownNameError


class VocabularyError(UserError):
    """A vocabulary file that is missing or not a list of class names."""


@dataclass(frozen=True)
class Vocabulary:
    name: str
    description: str
    loader: Callable[[], list[str]]

    def load(self) -> list[str]:
        return list(self.loader())


VOCABULARIES: Registry[Vocabulary] = Registry("vocabulary")

# name -> (json file in vocabularies/, description, expected count)
_PUBLIC = {
    "coco-stuff": ("COCO-Stuff 164k (171 things + stuff; training set)", 171),
    "ade-150": ("ADE20K SceneParsing (A-150)", 150),
    "ade-847": ("ADE20K full (A-847)", 847),
    "pc-59": ("PASCAL Context 59 (PC-59)", 59),
    "pc-459": ("PASCAL Context full (PC-459)", 459),
    "voc-20": ("PASCAL VOC 2012, background ignored (PAS-20)", 20),
}


def _packaged_list(name: str, count: int) -> Callable[[], list[str]]:
    def load() -> list[str]:
        text = resources.files("dpseg.data").joinpath("vocabularies", f"{name}.json").read_text("utf-8")
        names = _validate(json.loads(text), f"packaged vocabulary {name!r}")
        if len(names) != count:  # a damaged install must not silently shift labels
            raise VocabularyError(
                f"packaged vocabulary {name!r} has {len(names)} names, expected {count}; reinstall dpseg"
            )
        return names

    return load


def _shapes() -> list[str]:
    from dpseg.data.shapes import SHAPES_CATEGORIES

    return list(SHAPES_CATEGORIES)


def _shapes_background() -> list[str]:
    from dpseg.data.shapes import WORLD_CATEGORIES

    return list(WORLD_CATEGORIES)


for _name, (_description, _count) in _PUBLIC.items():
    VOCABULARIES.register(_name, Vocabulary(_name, _description, _packaged_list(_name, _count)))
VOCABULARIES.register(
    "shapes", Vocabulary("shapes", "synthetic colour x texture x shape benchmark (offline default)", _shapes)
)
VOCABULARIES.register(
    "shapes-background",
    Vocabulary("shapes-background", "the shapes benchmark with its canvas as a class (the demo's world)", _shapes_background),
)


def vocab_names() -> list[str]:
    return VOCABULARIES.names()


def load_vocab(name_or_path: str) -> list[str]:
    """A registered vocabulary name, or a `.txt` file (one class per line) or `.json` list."""
    if name_or_path in VOCABULARIES:
        return VOCABULARIES.get(name_or_path).load()
    if _looks_like_path(name_or_path):
        return load_vocab_file(name_or_path)
    known = ", ".join(vocab_names())
    # the registry's own error type, so callers catch one class for "unknown name"
    raise UnknownNameError(
        f"unknown vocabulary {cut(name_or_path)!r}; known: {known} (or pass a .txt/.json file of class names)"
    )


def _looks_like_path(text: str) -> bool:
    return text.endswith((".txt", ".json")) or "/" in text or "\\" in text or _exists(text)


def _exists(text: str) -> bool:
    try:  # a long inline list is no file name ("File name too long" is the answer, not a file)
        return Path(text).exists()
    except (OSError, ValueError):
        return False


def parse_classes(text: str, option: str = "--classes") -> list[str]:
    """What a user means by `--classes TEXT`: a value with a comma is class names, whatever its
    length or characters ("car, truck/lorry"); otherwise a registered vocabulary, an existing
    .txt/.json file, or one class name. Errors quote long values cut to their first names."""
    text = text.strip()
    if "," not in text:
        if not text:
            raise VocabularyError(
                f'{option} is empty: no classes; give names ("cat, dog"), a vocabulary name or a .txt/.json file'
            )
        if text in VOCABULARIES:
            return VOCABULARIES.get(text).load()
        if text.endswith((".txt", ".json")) or _exists(text):
            return load_vocab_file(text)
        return [unicodedata.normalize("NFC", text)]
    names = [unicodedata.normalize("NFC", n.strip()) for n in text.split(",")]
    names = [n for n in names if n]
    if not names:
        raise VocabularyError(f"{option} is empty ({cut(text)!r}): no classes; give names such as 'cat, dog'")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise VocabularyError(
                f"{option} names the class {cut(n)!r} twice (names {seen[n] + 1} and {i + 1} of {len(names)}: "
                f"{shorten(names)}); give each class once"
            )
        seen[n] = i
    return names


def cut(text: str, limit: int = 40) -> str:
    """`text`, cut to `limit` characters for an error line."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shorten(names: list[str], first: int = 3) -> str:
    """'a', 'b', 'c' … and N more: a long list of names as an error line quotes it."""
    shown = ", ".join(repr(cut(n, 30)) for n in names[:first])
    return shown + (f" … and {len(names) - first} more" if len(names) > first else "")


def load_vocab_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise VocabularyError(
            f"vocabulary file {cut(str(path), 120)!r} does not exist; "
            f"pass a registered name ({', '.join(vocab_names())}) or an existing .txt/.json file"
        )
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise VocabularyError(f"cannot read vocabulary file {str(path)!r}: {err}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise VocabularyError(
                f"vocabulary file {str(path)!r} is not valid JSON ({err}); expected a list of class names"
            ) from None
        return _validate(data, f"vocabulary file {str(path)!r}")
    # text: one class per line; blank lines and '#' comments are skipped
    lines = [line.strip() for line in text.splitlines()]
    return _validate([line for line in lines if line and not line.startswith("#")], f"vocabulary file {str(path)!r}")


def _validate(data: object, what: str) -> list[str]:
    if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
        raise VocabularyError(f"{what} must be a list of class-name strings")
    if not data:
        raise VocabularyError(f"{what} holds no class names")
    # one spelling per name: "naïve" typed precomposed or as "i" + combining diaeresis is one class
    data = [unicodedata.normalize("NFC", n) for n in data]
    empty = [i for i, n in enumerate(data) if not n.replace(",", "").strip()]
    if empty:
        raise VocabularyError(f"{what}: entry {empty[0]} is an empty class name")
    seen: dict[str, int] = {}
    for i, n in enumerate(data):
        if n in seen:
            raise VocabularyError(f"{what}: class {n!r} appears twice (entries {seen[n]} and {i})")
        seen[n] = i
    return list(data)


def vocab_counts() -> dict[str, int]:
    """Registered name -> number of classes (what `dpseg data vocab list` prints)."""
    return {name: len(load_vocab(name)) for name in vocab_names()}
