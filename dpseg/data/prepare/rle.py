"""COCO run-length encoding, decoded without pycocotools (PC-59's trainval_merged.json).

A mask is stored column-major as alternating run lengths, starting with a run of zeros.
The compressed form writes each run as a little-endian sequence of 5-bit groups in chars
from '0' (48): bit 0x20 = "more groups follow", bit 0x10 of the last group = sign; from
the fourth run on (index 3), a run is stored as the difference to the run two places before.
"""

from __future__ import annotations

import numpy as np


def decode_counts(text: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError("RLE string ends inside a number")
            group = ord(text[pos]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"RLE string has an invalid character {text[pos]!r}")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            shift += 5
            pos += 1
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode(segmentation: dict) -> np.ndarray:
    """{'size': [h, w], 'counts': str | list[int]} -> (h, w) bool mask."""
    height, width = (int(v) for v in segmentation["size"])
    counts = segmentation["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = decode_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE runs sum to {sum(runs)} (negative: {any(r < 0 for r in runs)}), "
                         f"expected {height}x{width}={height * width}")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(width, height).T


def encode_counts(mask: np.ndarray) -> str:
    """The compressed string of a bool mask (for tests and tiny fixtures)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    runs, current, length = [], False, 0
    for value in flat:
        if value == current:
            length += 1
        else:
            runs.append(length)
            current, length = value, 1
    runs.append(length)
    chars = []
    for i, run in enumerate(runs):
        value = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = not ((value == 0 and not group & 0x10) or (value == -1 and group & 0x10))
            chars.append(chr(48 + (group | (0x20 if more else 0))))
    return "".join(chars)
