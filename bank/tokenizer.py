"""A CLIP BPE tokenizer for diffusers pipelines, built offline from the BPE table that
open_clip ships (`bpe_simple_vocab_16e6.txt.gz`): transformers ships no CLIP vocab files and
no machine of this project can download them. Used by `tiny-sd` and `sd15-random`."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import open_clip

NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses (the file holds more)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table, in CLIP's vocab order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges as 'a b' lines): the 49,408-token CLIP vocabulary."""
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(max_length: int = 77):
    """A transformers `CLIPTokenizer` equal to CLIP's own (same ids as open_clip's)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=max_length)
