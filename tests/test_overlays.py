"""Overlay shards: round trip, ids with dots, settings guard, one-line errors."""

from __future__ import annotations

import tarfile

import pytest
import torch

from bank.overlays import OverlayReader, OverlayWriter, sample_key, shard_name
from dpseg.errors import UserError
from dpseg.refine import Refinement


def refinement(seed: int, counts: list[int]) -> Refinement:
    g = torch.Generator().manual_seed(seed)
    k = sum(counts)

    def values(*shape):  # float16-exact, as overlays store them
        return torch.randn(*shape, generator=g).half().float()

    areas = torch.tensor([10 * (i + 1) for i in range(len(counts))], dtype=torch.int64)
    return Refinement(
        classes=torch.arange(len(counts)) * 2,
        areas=areas,
        counts=torch.tensor(counts, dtype=torch.int64),
        embedding=values(k, 6),
        pooled={4: values(k, 2), 8: values(k, 3), 16: values(k, 5)},
    )


def assert_same(a: Refinement, b: Refinement) -> None:
    for name in ("classes", "areas", "counts", "embedding"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for s in (4, 8, 16):
        assert torch.equal(a.pooled[s], b.pooled[s])


def test_round_trip_across_shards_with_odd_ids(tmp_path):
    settings = {"encoder": "tiny", "refinement": {"min_area": 64}}
    writer = OverlayWriter(tmp_path, settings)
    items = {"000001": refinement(0, [1, 2]), "ADE_val.0002": refinement(1, [1]), "empty": refinement(2, [])}
    ids = list(items)
    writer.write_shard(0, [(i, items[i], {"class_ids": [7]}) for i in ids[:2]])
    writer.write_shard(1, [(ids[2], items[ids[2]], {})])
    assert writer.exists(0) and writer.exists(1) and not writer.exists(2)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [shard_name(0), shard_name(1)]
    reader = OverlayReader(tmp_path)
    assert sorted(reader.ids()) == sorted(ids) and reader.settings == settings
    for image_id, ref in items.items():
        assert image_id in reader
        assert_same(reader.read(image_id), ref)
    meta = reader.meta("ADE_val.0002")
    assert meta["id"] == "ADE_val.0002" and meta["settings"] == settings and meta["counts"] == [1]
    assert reader.meta("000001")["class_ids"] == [7]
    # the files are plain webdataset samples: no pickle, keys without dots
    with tarfile.open(tmp_path / shard_name(0)) as tar:
        names = tar.getnames()
    assert f"{sample_key('ADE_val.0002')}.embedding.npy" in names and "." not in sample_key("ADE_val.0002")
    assert not any(n.endswith((".pickle", ".pyd", ".pth")) for n in names)
    reader.close()


def test_rewriting_a_shard_replaces_it_whole(tmp_path):
    writer = OverlayWriter(tmp_path, {"a": 1})
    writer.write_shard(0, [("x", refinement(0, [1]), {})])
    writer.write_shard(0, [("y", refinement(1, [2]), {})])
    reader = OverlayReader(tmp_path)
    assert reader.ids() == ["y"] and not list(tmp_path.glob(".*.tmp"))


def test_other_settings_are_refused(tmp_path):
    OverlayWriter(tmp_path, {"encoder": "tiny", "min_area": 64})
    with pytest.raises(UserError, match="other settings.*min_area"):
        OverlayWriter(tmp_path, {"encoder": "tiny", "min_area": 0})


def test_missing_folder_id_and_damaged_shard_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="holds no overlays"):
        OverlayReader(tmp_path / "none")
    OverlayWriter(tmp_path, {}).write_shard(0, [("a", refinement(0, [1]), {})])
    with pytest.raises(UserError, match="no overlay for image 'b'"):
        OverlayReader(tmp_path).read("b")
    (tmp_path / shard_name(1)).write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(UserError, match="overlay shard .* is unreadable") as err:
        OverlayReader(tmp_path)
    assert "\n" not in str(err.value)
