"""Bank build: round trip (shards, manifest, zarr vs an independent encoding), determinism
across batch sizes, black-image rejection and retries, resume after a SIGKILL at each commit
point, settings mismatch."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from PIL import Image

from bank.build import BuildSettings, build_bank
from bank.encode import PromptEncoder
from bank.generators.base import Generated, Generator, GeneratorSettings, create_generator
from bank.inspection import info, verify
from bank.plan import retry_seed
from bank.reader import Bank
from bank.store import ShardReader
from dpseg.errors import UserError

CATS = ["cat", "dog", "building, edifice"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return PromptEncoder("tiny", None)


@pytest.fixture(scope="module")
def tiny_sd():
    return create_generator("tiny-sd", GeneratorSettings(resolution=32, steps=2))


@pytest.fixture
def vocab(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(CATS) + "\n")
    return str(path)


def opts(out, vocab, **kw):
    base = dict(
        out=Path(out),
        generator="tiny-sd",
        vocab=[vocab],
        encoder="tiny",
        encoder_weights=None,
        templates=3,
        batch_size=4,
        shard_size=4,
        progress=False,
        generator_options=GeneratorSettings(resolution=32, steps=2),
    )
    base.update(kw)
    return BuildSettings(**base)


def bank_contents(root):
    """key -> (category, template, status, pixels or None) read straight from the shards."""
    table = pq.read_table(Path(root) / "manifest.parquet").to_pylist()
    out = {}
    for r in table:
        with ShardReader(Path(root) / r["shard"]) as reader:
            png = reader.read(r["key"], "png") if r["status"] == "ok" else None
        pixels = None if png is None else np.asarray(Image.open(io.BytesIO(png)))
        out[r["key"]] = (r["category"], r["template"], r["status"], pixels)
    return out


def test_round_trip_shards_manifest_features(tmp_path, vocab, tiny_sd, encoder):
    report = build_bank(opts(tmp_path / "b", vocab), generator=tiny_sd, encoder=encoder)
    assert report["ok"] == 9 and report["failed"] == 0 and report["merge"]["new_entries"] == 9
    contents = bank_contents(tmp_path / "b")
    assert sorted({(c, t) for c, t, _, _ in contents.values()}) == [
        (c, t) for c in ("building", "cat", "dog") for t in range(3)
    ]
    # features in the zarr equal an independent encoding of the stored PNGs
    group = zarr.open_group(str(tmp_path / "b" / "features.zarr" / "tiny@128"), mode="r")
    cats = group.attrs["categories"]
    assert cats == ["cat", "dog", "building"] and group.attrs["templates"] == 3
    assert group.attrs["generator"]["id"] == "tiny-sd" and group.attrs["encoder"]["encoder"] == "tiny"
    assert group["embedding"].shape == (3, 3, encoder.info["embed_dim"]) and group["embedding"].dtype == np.float16
    assert group["pooled_8"].shape == (3, 3, encoder.info["channels"]["8"])
    assert group["valid"][:].all()
    for _key, (c, t, _status, pixels) in contents.items():
        expect = encoder(pixels[None])
        for name in ("embedding", "pooled_4", "pooled_8", "pooled_16"):
            np.testing.assert_allclose(group[name][cats.index(c), t], expect[name][0], rtol=1e-2, atol=1e-2)
    # the reader: vocabulary order, synonyms, shapes
    protos = Bank(tmp_path / "b").prototypes(["dog", "building, edifice", "cat", "dog"], "tiny")
    assert protos.embedding.shape == (4, 3, encoder.info["embed_dim"]) and protos.embedding.dtype == torch.float32
    np.testing.assert_array_equal(protos.embedding[0].numpy(), group["embedding"][1].astype(np.float32))
    np.testing.assert_array_equal(protos.pooled[16][1].numpy(), group["pooled_16"][2].astype(np.float32))
    torch.testing.assert_close(protos.embedding[0], protos.embedding[3])
    assert verify(tmp_path / "b") == []
    assert info(tmp_path / "b")["entries"] == 9


def test_images_do_not_depend_on_batch_size(tmp_path, vocab, tiny_sd, encoder):
    build_bank(opts(tmp_path / "a", vocab, batch_size=1), generator=tiny_sd, encoder=encoder)
    build_bank(opts(tmp_path / "b", vocab, batch_size=9, shard_size=100), generator=tiny_sd, encoder=encoder)
    a, b = bank_contents(tmp_path / "a"), bank_contents(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        diff = np.abs(a[key][3].astype(int) - b[key][3].astype(int)).max()
        assert diff <= 1, f"{key}: batch size changed the image by {diff}/255"


def test_extending_templates_and_categories_keeps_existing_entries(tmp_path, vocab, tiny_sd, encoder):
    first = build_bank(opts(tmp_path / "b", vocab, templates=2), generator=tiny_sd, encoder=encoder)
    more = tmp_path / "more.txt"
    more.write_text("cat\ntree\n")
    second = build_bank(opts(tmp_path / "b", str(more), templates=3), generator=tiny_sd, encoder=encoder)
    assert first["ok"] == 6 and second["already_done"] == 2 and second["ok"] == 4
    third = build_bank(opts(tmp_path / "b", vocab, templates=3), generator=tiny_sd, encoder=encoder)
    assert third["ok"] == 2  # the third template of dog and building
    report = info(tmp_path / "b")
    assert (report["entries"], report["categories"], report["templates"]) == (12, 4, 3)
    assert verify(tmp_path / "b") == []


class FlakyGenerator(Generator):
    """Black for the first seed of 'cat' entries (then fine), always NaN for 'dog' entries."""

    id = "flaky"

    def __init__(self):
        super().__init__({"kind": "test"}, {"device": "cpu", "dtype": "float32", "compile": []})
        self.calls = []

    @classmethod
    def create(cls, options):
        return cls()

    def generate(self, requests):
        self.calls.append([r.seed for r in requests])
        images = []
        for r in requests:
            g = torch.Generator().manual_seed(r.seed)
            image = torch.rand(3, 32, 32, generator=g)
            if r.category == "dog":
                image = image * float("nan")  # what an fp16 overflow gives
            images.append(image)
        out = torch.stack(images)
        for i, r in enumerate(requests):
            if r.category == "cat" and r.seed == self.first_seeds.get(r.prompt):
                out[i] = 0.0  # what SD's safety checker returns
        return Generated(images=out)


def test_black_and_nan_images_are_retried_then_failed(tmp_path, vocab, encoder):
    from bank.plan import plan_entries

    gen = FlakyGenerator()
    planned = plan_entries(["cat", "dog", "building"], 2, gen.id, gen.settings_hash, 0)
    gen.first_seeds = {e.prompt: e.seed for e in planned}
    report = build_bank(opts(tmp_path / "b", vocab, templates=2, retries=2), generator=gen, encoder=encoder)
    assert report["ok"] == 4 and report["failed"] == 2
    rows = {(r["category"], r["template"]): r for r in pq.read_table(tmp_path / "b" / "manifest.parquet").to_pylist()}
    for t in range(2):
        cat, dog = rows[("cat", t)], rows[("dog", t)]
        assert cat["status"] == "ok" and cat["attempts"] == 2 and cat["used_seed"] == retry_seed(cat["seed"], 1)
        assert dog["status"] == "failed" and dog["reason"] == "nan" and dog["attempts"] == 3
        with ShardReader(tmp_path / "b" / dog["shard"]) as reader:
            assert "png" not in reader.members[dog["key"]]  # never stored as a valid image
    valid = zarr.open_group(str(tmp_path / "b" / "features.zarr" / "tiny@128"), mode="r")["valid"][:]
    assert valid.tolist() == [[True, True], [False, False], [True, True]]
    with pytest.raises(UserError, match="'dog'"):
        Bank(tmp_path / "b").prototypes(["cat", "dog"], "tiny")
    assert info(tmp_path / "b")["failed"] == 2 and verify(tmp_path / "b") == []


REPO = Path(__file__).resolve().parents[1]


def cli_build(out, vocab, env=None, extra=()):
    """`dpseg bank build` in a child process (the CLI, as a user runs it)."""
    args = [
        sys.executable,
        "-m",
        "cli.main",
        "bank",
        "build",
        "--generator",
        "tiny-sd",
        "--vocab",
        vocab,
        "--encoder",
        "tiny",
        "--encoder-weights",
        "none",
        "--out",
        str(out),
        "--templates",
        "3",
        "--resolution",
        "32",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--shard-size",
        "2",
        "--no-progress",
        *extra,
    ]
    return subprocess.Popen(
        args, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def clean_bank(tmp_path_factory, tiny_sd, encoder):
    root = tmp_path_factory.mktemp("clean")
    (root / "names.txt").write_text("\n".join(CATS) + "\n")
    build_bank(opts(root / "bank", str(root / "names.txt"), shard_size=2), generator=tiny_sd, encoder=encoder)
    return root / "bank"


def assert_same_bank(a_root, b_root):
    a, b = bank_contents(a_root), bank_contents(b_root)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][:3] == b[key][:3]
        assert np.abs(a[key][3].astype(int) - b[key][3].astype(int)).max() <= 1
    ea = Bank(a_root).prototypes(CATS, "tiny")
    eb = Bank(b_root).prototypes(CATS, "tiny")
    torch.testing.assert_close(ea.embedding, eb.embedding, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ea.pooled[4], eb.pooled[4], rtol=1e-2, atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["tar:3", "part:2", "merge:1"])
def test_sigkill_at_each_commit_point_resumes_to_the_clean_bank(tmp_path, vocab, tiny_sd, encoder, clean_bank, crash):
    """SIGKILL mid-shard, between a shard's link and its feature part, and mid-merge."""
    killed = tmp_path / "killed"
    proc = cli_build(killed, vocab, env={"DPSEG_BANK_CRASH": crash})
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == -signal.SIGKILL, output
    report = build_bank(opts(killed, vocab, shard_size=2), generator=tiny_sd, encoder=encoder)
    assert report["ok"] + report["already_done"] == 9
    if crash.startswith("part"):
        assert report["recovered_images"] > 0  # images kept, features re-encoded from them
    assert_same_bank(clean_bank, killed)
    assert verify(killed) == [] and info(killed)["entries"] == 9
    assert not list((killed / "tmp").glob("*.tar"))


def test_settings_mismatch_and_foreign_folder_are_user_errors(tmp_path, vocab, tiny_sd, encoder):
    build_bank(opts(tmp_path / "b", vocab, templates=1), generator=tiny_sd, encoder=encoder)
    with pytest.raises(UserError, match="holds a bank of generator 'tiny-sd'.*seed 0.*seed 5"):
        build_bank(opts(tmp_path / "b", vocab, templates=1, seed=5), generator=tiny_sd, encoder=encoder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is not a bank"):
        build_bank(opts(tmp_path / "other", vocab, templates=1), generator=tiny_sd, encoder=encoder)
    with pytest.raises(UserError, match="--shard-index"):
        build_bank(opts(tmp_path / "c", vocab, shard_index=2, num_shards=2), generator=tiny_sd, encoder=encoder)


def test_job_array_shards_split_the_work_without_overlap(tmp_path, vocab, tiny_sd, encoder):
    r0 = build_bank(opts(tmp_path / "b", vocab, shard_index=0, num_shards=2), generator=tiny_sd, encoder=encoder)
    assert 0 < r0["ok"] < 9 and info(tmp_path / "b")["missing"] == 9 - r0["ok"]
    r1 = build_bank(opts(tmp_path / "b", vocab, shard_index=1, num_shards=2), generator=tiny_sd, encoder=encoder)
    assert r0["ok"] + r1["ok"] == 9 and r1["already_done"] == r0["ok"]
    assert verify(tmp_path / "b") == [] and info(tmp_path / "b")["entries"] == 9
    build_bank(opts(tmp_path / "one", vocab), generator=tiny_sd, encoder=encoder)
    assert bank_contents(tmp_path / "b").keys() == bank_contents(tmp_path / "one").keys()
