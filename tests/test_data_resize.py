"""A-847 labels are shrunk exactly as SED's OpenCV INTER_NEAREST does it."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpseg.data.prepare.common import Item, convert_item
from dpseg.data.prepare.resize import nearest_index, resize_nearest

FIXTURE = Path(__file__).parent / "fixtures" / "opencv_nearest_index.json"


def test_nearest_index_equals_opencv_outputs():
    # recorded from OpenCV 4.10 (the call is in the file), including the size pairs where the
    # exact floor(i * src / dst) is one more than what OpenCV takes
    data = json.loads(FIXTURE.read_text())
    exact_differs = 0
    for case in data["cases"]:
        src, dst = case["src"], case["dst"]
        np.testing.assert_array_equal(nearest_index(src, dst), case["index"], err_msg=f"{src} -> {dst}")
        exact = np.minimum(np.arange(dst) * src // dst, src - 1)
        exact_differs += not np.array_equal(exact, case["index"])
    assert exact_differs >= 10  # the fixture really holds the cases that tell the two apart


@pytest.mark.parametrize("src", [1, 2, 3, 7, 97, 512, 683, 1000, 1333, 2048])
def test_nearest_index_is_the_rational_floor_except_on_exact_multiples(src):
    # an independent computation with exact fractions: away from whole numbers the index is
    # floor(i * src / dst); on a whole number OpenCV's double product may fall one below it
    for dst in (1, 2, 5, 64, 100, 333, 512, 700, 1024):
        ours = nearest_index(src, dst)
        assert ours.shape == (dst,) and ours.min() >= 0 and ours.max() <= src - 1
        for i in range(dst):
            value = Fraction(i * src, dst)
            floor = min(value.numerator // value.denominator, src - 1)
            if value.denominator == 1:
                assert ours[i] in (floor, floor - 1)
            else:
                assert ours[i] == floor, (src, dst, i)


def test_resize_nearest_copies_values_of_any_dtype():
    label = (np.arange(7 * 11, dtype=np.uint32) * 100003).reshape(7, 11)
    out = resize_nearest(label, 3, 5)
    assert out.dtype == label.dtype and out.shape == (3, 5)
    np.testing.assert_array_equal(out, label[nearest_index(7, 3)][:, nearest_index(11, 5)])
    np.testing.assert_array_equal(resize_nearest(label, 7, 11), label)


def test_shrunk_item_uses_the_opencv_label_indexing(tmp_path):
    # an A-847-style item (short side above the limit): the label goes through the OpenCV indexing,
    # not Pillow's pixel-centre sampling (they differ on this size pair)
    h, w, short = 37, 53, 10
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    label = np.arange(h * w, dtype=np.uint16).reshape(h, w) % 800
    item = Item("val", "a", tmp_path / "a.png", lambda: label, max_short_side=short)
    picture, ext, out = convert_item(item)
    new_w = round(w / h * short)
    assert out.shape == (short, new_w) and picture.size == (new_w, short)
    rows = [int(Fraction(i * h, short)) for i in range(short)]  # no exact multiples here but i = 0
    cols = [int(Fraction(j * w, new_w)) for j in range(new_w)]
    np.testing.assert_array_equal(out, label[np.ix_(rows, cols)])
    pil = np.asarray(Image.fromarray(label).resize((new_w, short), Image.NEAREST))
    assert (pil != out).any()
