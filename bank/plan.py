"""Which entries a bank holds: vocabularies -> distinct category names -> (category, template)
entries with their prompt, stable seed and key."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dpseg.clip.templates import primary_name
from dpseg.clip.templates import templates as first_templates
from dpseg.errors import UserError

SEED_MASK = 2**63 - 1


@dataclass(frozen=True)
class Entry:
    key: str  # hex, no dots (a webdataset key)
    category: str  # the primary name
    template_index: int
    template: str
    prompt: str
    seed: int


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()


def entry_seed(prompt: str, settings_hash: str, base_seed: int) -> int:
    """Stable across runs, ranks, batch sizes and Python versions (no `hash()`)."""
    return int.from_bytes(_digest("seed", settings_hash, prompt, base_seed)[:8], "big") & SEED_MASK


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of retry `attempt` (1, 2, ...) after an image failed its check."""
    return int.from_bytes(_digest("retry", seed, attempt)[:8], "big") & SEED_MASK


def entry_key(generator_id: str, settings_hash: str, prompt: str, seed: int) -> str:
    """An entry's identity: (generator id + settings hash, prompt, seed)."""
    return _digest("entry", generator_id, settings_hash, prompt, seed).hex()[:24]


def plan_entries(
    categories: Sequence[str], num_templates: int, generator_id: str, settings_hash: str, base_seed: int
) -> list[Entry]:
    try:
        chosen = first_templates(num_templates)
    except ValueError as err:
        raise UserError(f"--templates: {err}") from None
    entries = []
    for category in categories:
        for t, template in enumerate(chosen):
            prompt = template.format(category)
            seed = entry_seed(prompt, settings_hash, base_seed)
            entries.append(
                Entry(entry_key(generator_id, settings_hash, prompt, seed), category, t, template, prompt, seed)
            )
    return entries


def in_job_shard(key: str, shard_index: int, num_shards: int) -> bool:
    """Split for scheduler job arrays: by the entry key alone, so jobs that start at different
    times (and see different finished work) never overlap."""
    return int(key[:12], 16) % num_shards == shard_index


def load_names(spec: str) -> list[str]:
    """A registered vocabulary name or a .txt/.json file of class names."""
    from dpseg.data.vocab import load_vocab

    return list(load_vocab(spec))


def split_specs(specs: Iterable[str]) -> list[str]:
    out = []
    for spec in specs:
        out += [s.strip() for s in spec.split(",") if s.strip()] if not Path(spec).exists() else [spec]
    return out


def resolve_categories(vocabs: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Distinct primary names over all vocabularies, in first-seen order; also the number of
    class names each vocabulary lists (for the dedup report)."""
    categories: dict[str, None] = {}
    counts: dict[str, int] = {}
    for spec in split_specs(vocabs):
        names = load_names(spec)
        if not names:
            raise UserError(f"vocabulary {spec!r} lists no class names")
        counts[spec] = len(names)
        for name in names:
            try:
                categories.setdefault(primary_name(name), None)
            except ValueError:
                raise UserError(f"vocabulary {spec!r} holds an empty class name") from None
    if not categories:
        raise UserError("no vocabulary given: pass --vocab NAME or --vocab FILE")
    return list(categories), counts
