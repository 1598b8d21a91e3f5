"""`bank encode` as a pipeline (PNG decode in DataLoader worker processes, parts written on a
thread): the features are bit-identical to encoding shard by shard in the main process, and a
broken PNG read by a worker is still one clear error line."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from bank.build import BuildSettings, build_bank
from bank.encode import PromptEncoder, encode_bank, encode_shards
from bank.store import FEATURE_NAMES, BankStore, ShardReader, decode_png
from dpseg.errors import UserError


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode-pipeline")
    (root / "names.txt").write_text("red circle\nblue square\ngreen triangle\n")
    build_bank(
        BuildSettings(
            out=root / "bank",
            generator="procedural",
            vocab=[str(root / "names.txt")],
            encoder="tiny",
            encoder_weights=None,
            encode_size=64,
            templates=3,
            batch_size=4,
            shard_size=4,
            progress=False,
        )
    )
    return root / "bank"


@pytest.fixture(scope="module")
def encoder():
    return PromptEncoder("tiny", None, encode_size=96)  # a new group: tiny@96


def serial_features(store: BankStore, encoder: PromptEncoder, shard: str, batch_size: int):
    """The reference: the shard's PNGs decoded one by one here, encoded in batches of `batch_size`."""
    with ShardReader(store.root / shard) as reader:
        keys = [k for k, files in reader.members.items() if "png" in files]
        images = [decode_png(reader.read(k, "png")) for k in keys]
    out = {n: [] for n in FEATURE_NAMES}
    for i in range(0, len(images), batch_size):
        for n, v in encoder(np.stack(images[i : i + batch_size])).items():
            out[n].append(v)
    return keys, {n: np.concatenate(v) for n, v in out.items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_pipelined_features_equal_serial_encoding_bit_for_bit(bank, encoder, workers):
    store = BankStore(bank)
    shards = store.shards()
    assert len(shards) == 3  # 9 entries in shards of 4: 4, 4, 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert encode_shards(store, encoder, shards, batch_size=3, progress=False, workers=workers) == 9
        for shard in shards:
            want_keys, want = serial_features(store, encoder, shard, 3)
            keys, feats = store.read_part(encoder.group, shard)
            assert keys == want_keys
            for n in FEATURE_NAMES:
                assert feats[n].dtype == np.float16 and np.array_equal(
                    feats[n].view(np.uint16), want[n].view(np.uint16)
                ), n
    finally:
        torch.set_num_threads(threads)


def test_encode_bank_merges_the_pipelined_group_once(bank, encoder, tmp_path):
    import shutil

    copy = tmp_path / "bank"
    shutil.copytree(bank, copy, ignore=shutil.ignore_patterns(encoder.group))  # no parts of tiny@96 yet
    report = encode_bank(copy, "tiny", None, "cpu", batch_size=8, progress=False, encoder=encoder, workers=1)
    assert report["images"] == 9 and report["shards"] == 3
    assert report["merge"]["features"][encoder.group] == 9  # every part merged, in one merge


def test_a_broken_png_read_by_a_worker_is_one_line(bank, encoder, tmp_path):
    import shutil

    copy = tmp_path / "bank"
    shutil.copytree(bank, copy, ignore=shutil.ignore_patterns(encoder.group))
    store = BankStore(copy)
    shard = store.shards()[1]
    path = copy / shard
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    victim = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            data = b"not a png" + data[:20] if m.name == victim else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(UserError) as err:
        encode_shards(store, encoder, store.shards(), batch_size=2, progress=False, workers=1)
    message = str(err.value)
    assert "\n" not in message and "is not a readable PNG" in message and victim.split(".")[0] in message
    assert store.part_keys(encoder.group, store.shards()[0]) is not None  # the shard before was written
    assert store.part_keys(encoder.group, shard) is None
