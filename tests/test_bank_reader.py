"""Names in (vocabularies, dedup, seeds, job split) and prototypes out (reader API, errors)."""

from __future__ import annotations

import numpy as np
import pytest

from bank.merge import open_features_group
from bank.plan import entry_seed, in_job_shard, plan_entries, resolve_categories, retry_seed
from bank.reader import Bank
from bank.store import SCHEMA_VERSION, BankStore, feature_group
from dpseg.clip.templates import TEMPLATES
from dpseg.errors import UserError


def test_names_are_deduplicated_across_vocabularies_by_primary_name(tmp_path):
    (tmp_path / "a.txt").write_text("building, edifice\ncat\n")
    (tmp_path / "b.json").write_text('["cat", "building", "sky, heaven"]')
    cats, counts = resolve_categories([str(tmp_path / "a.txt"), str(tmp_path / "b.json")])
    assert cats == ["building", "cat", "sky"] and sum(counts.values()) == 5
    six, counts = resolve_categories(["coco-stuff,ade-150,ade-847", "pc-59", "pc-459", "voc-20"])
    assert len(six) == 1166 and sum(counts.values()) == 1706  # DESIGN.md: 93,280 prompts instead of 136,480
    with pytest.raises(UserError, match="no-such"):
        resolve_categories(["no-such"])


def test_entries_seeds_and_keys_are_stable_and_distinct():
    entries = plan_entries(["cat", "dog"], 10, "sd15", "abc", 0)
    assert [e.prompt for e in entries[:2]] == [TEMPLATES[0].format("cat"), TEMPLATES[1].format("cat")]
    assert entries == plan_entries(["cat", "dog"], 10, "sd15", "abc", 0)
    assert len({e.seed for e in entries}) == len({e.key for e in entries}) == 20
    assert all("." not in e.key for e in entries)
    # the seed hashes (prompt, settings, base seed) only: not the position or the other categories
    assert plan_entries(["dog"], 1, "sd15", "abc", 0)[0] == entries[10]
    assert entry_seed(entries[0].prompt, "abc", 1) != entries[0].seed
    assert entry_seed(entries[0].prompt, "abd", 0) != entries[0].seed
    assert retry_seed(entries[0].seed, 1) not in (entries[0].seed, retry_seed(entries[0].seed, 2))
    with pytest.raises(UserError, match="templates"):
        plan_entries(["cat"], 81, "sd15", "abc", 0)


def test_job_array_split_is_a_partition():
    keys = [e.key for e in plan_entries([f"c{i}" for i in range(30)], 10, "sd15", "abc", 0)]
    owners = [[j for j in range(4) if in_job_shard(k, j, 4)] for k in keys]
    assert all(len(o) == 1 for o in owners)
    assert {o[0] for o in owners} == {0, 1, 2, 3}


def make_bank(root, categories, templates=4, valid=None, encoder="tiny", sizes=(128,)):
    """Random features written straight into the bank layout, one group per encode size."""
    store = BankStore(root)
    info = {"encoder": encoder, "weights": "random", "embed_dim": 6, "channels": {"4": 2, "8": 3, "16": 5}}
    config = {
        "schema": SCHEMA_VERSION,
        "generator": {"id": "tiny-sd", "settings": {}, "settings_hash": "h"},
        "seed": 0,
        "categories": categories,
        "templates": templates,
        "encoders": {encoder: {**info, "encode_sizes": list(sizes)}},
    }
    store.write_config(config)
    data = {}
    for size in sizes:
        data[size] = _write_group(store, encoder, size, info, config, categories, templates, valid)
    return data[sizes[0]] if len(sizes) == 1 else data


def _write_group(store, encoder, size, info, config, categories, templates, valid):
    info = {**info, "encode_size": size}
    group, arrays = open_features_group(store, feature_group(encoder, size), info, config, len(categories), templates)
    rng = np.random.default_rng(size)
    data = {}
    for name, arr in arrays.items():
        data[name] = (
            np.ones(arr.shape, bool)
            if name == "valid" and valid is None
            else valid
            if name == "valid"
            else rng.standard_normal(arr.shape).astype(np.float16)
        )
        arr[:] = data[name]
    group.attrs.update(
        {
            "categories": categories,
            "templates": templates,
            "encoder": info,
            "generator": config["generator"],
            "schema": SCHEMA_VERSION,
            "encode_size": size,
        }
    )
    return data


def test_prototypes_in_vocabulary_order_with_failed_entries_filled(tmp_path):
    valid = np.ones((3, 4), bool)
    valid[1, 2] = False
    data = make_bank(tmp_path, ["cat", "dog", "building"], valid=valid)
    protos = Bank(tmp_path).prototypes(["building, edifice", "dog", "cat"], "tiny")
    assert protos.embedding.shape == (3, 4, 6) and protos.pooled[16].shape == (3, 4, 5)
    np.testing.assert_array_equal(protos.embedding[0].numpy(), data["embedding"][2].astype(np.float32))
    np.testing.assert_array_equal(protos.pooled[4][2].numpy(), data["pooled_4"][0].astype(np.float32))
    dog = data["embedding"][1].astype(np.float32)
    expect = dog[[0, 1, 3]].mean(axis=0)
    np.testing.assert_allclose(protos.embedding[1, 2].numpy(), expect, atol=2e-3)
    np.testing.assert_array_equal(protos.embedding[1, [0, 1, 3]].numpy(), dog[[0, 1, 3]])
    assert protos.filled.tolist() == [[False] * 4, [False, False, True, False], [False] * 4]
    assert Bank(tmp_path).prototypes(["cat"], "tiny", templates=2).embedding.shape == (1, 2, 6)


def test_reader_errors_name_the_fix(tmp_path):
    make_bank(tmp_path, ["cat", "dog"], templates=2)
    bank = Bank(tmp_path)
    with pytest.raises(UserError) as err:
        bank.prototypes(["cat", "unicorn", "dragon, wyvern"], "tiny")
    message = str(err.value)
    assert "2 classes" in message and "'unicorn'" in message and "'dragon, wyvern'" in message
    assert f"dpseg bank build --out {tmp_path} --generator tiny-sd --encoder tiny --templates 2" in message
    with pytest.raises(
        UserError, match=f"no features for encoder 'convnext-b' .*dpseg bank encode {tmp_path} --encoder convnext-b"
    ):
        bank.prototypes(["cat"], "convnext-b")
    with pytest.raises(UserError, match="holds 2 templates per class, 80 were asked"):
        bank.prototypes(["cat"], "tiny", templates=80)
    with pytest.raises(UserError, match="no bank at"):
        Bank(tmp_path / "nothing")
    (tmp_path / "bank.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        Bank(tmp_path)


def test_bank_stage_builds_the_bank_its_params_describe(tmp_path):
    """pipeline.bank_stage: a resolved `bank:` section -> a complete bank; encode_size honoured;
    unknown keys refused (pipeline/stages.py feeds it the profile-resolved params)."""
    from bank.inspection import info, verify
    from pipeline.bank_stage import build_settings, run_bank_stage

    section = {
        "generator": "procedural",
        "vocab": "shapes",
        "encoder": "tiny",
        "encoder_weights": "none",
        "templates": 2,
        "resolution": 32,
        "encode_size": 64,
        "out": str(tmp_path / "bank"),
    }
    opts = build_settings(section)
    assert opts.vocab == ["shapes"] and opts.encode_size == 64 and opts.encoder_weights is None
    assert opts.generator_options.resolution == 32 and opts.batch_size == 8  # BuildSettings' default
    run_bank_stage(section, progress=False)
    report = info(tmp_path / "bank")
    assert report["generator"] == "procedural" and report["entries"] == 48 * 2 and verify(tmp_path / "bank") == []
    assert report["encode_sizes"] == {"tiny": [64]} and Bank(tmp_path / "bank").encode_sizes("tiny") == [64]
    with pytest.raises(UserError, match="generatr"):
        build_settings({**section, "generatr": "sd15"})
    with pytest.raises(UserError, match="encoder must be set"):
        build_settings({k: v for k, v in section.items() if k != "encoder"})


def test_two_encode_sizes_live_side_by_side_and_a_mismatch_is_refused(tmp_path):
    data = make_bank(tmp_path, ["cat", "dog"], templates=2, sizes=(128, 64))
    bank = Bank(tmp_path)
    assert bank.encoders() == ["tiny"] and bank.encode_sizes("tiny") == [64, 128]
    assert bank.encode_size("tiny") == 128  # several sizes: the encoder's own input size (tiny: 128)
    for size in (64, 128):
        got = bank.prototypes(["dog"], "tiny", encode_size=size).embedding[0].numpy()
        np.testing.assert_array_equal(got, data[size]["embedding"][1].astype(np.float32))
    with pytest.raises(UserError) as err:
        bank.prototypes(["dog"], "tiny", encode_size=96)
    message = str(err.value)
    assert "encoded at 64, 128 px" in message and "asks for 96 px" in message
    assert f"dpseg bank encode {tmp_path} --encoder tiny --encode-size 96" in message
    one = tmp_path / "one"
    make_bank(one, ["cat"], templates=2, sizes=(64,))
    assert Bank(one).prototypes(["cat"], "tiny", encode_size=64).embedding.shape == (1, 2, 6)  # asked for: given
    with pytest.raises(UserError, match="encoded at 64 px, the model asks for 128 px"):
        Bank(one).prototypes(["cat"], "tiny", encode_size=128)


def test_a_bank_encoded_only_at_another_size_than_the_segmenters_input_is_refused(tmp_path):
    """The old-bank hazard: features encoded at 320 px (the tower's native size) used by a 768 px
    segmenter without a word. Unless the size is given, the reader refuses in one line that names
    both sizes and the command that re-encodes the bank."""
    make_bank(tmp_path, ["cat", "dog"], templates=2, encoder="convnext-b", sizes=(320,))
    bank = Bank(tmp_path)
    for read in (lambda: bank.encode_size("convnext-b"), lambda: bank.prototypes(["cat"], "convnext-b")):
        with pytest.raises(UserError) as err:
            read()
        message = str(err.value)
        assert "\n" not in message
        assert "encoded at 320 px only" in message and "segmenter's input is 768 px" in message
        assert f"dpseg bank encode {tmp_path} --encoder convnext-b --encode-size 768" in message
        assert "--encode-size 320" in message  # how to use them as they are
    got = bank.prototypes(["dog"], "convnext-b", encode_size=320)  # explicitly asked for: read
    assert got.embedding.shape == (1, 2, 6)
    at_input = tmp_path / "at-input"
    make_bank(at_input, ["cat"], templates=2, encoder="convnext-b", sizes=(768,))
    assert Bank(at_input).encode_size("convnext-b") == 768  # the segmenter's size: no word needed


@pytest.mark.parametrize("templates", [0, -1])
def test_templates_outside_what_the_bank_holds_are_refused(tmp_path, templates):
    make_bank(tmp_path, ["cat"], templates=2)
    with pytest.raises(UserError, match=f"between 1 and the 2 .* got {templates}"):
        Bank(tmp_path).prototypes(["cat"], "tiny", templates=templates)


def _chunks(root, array):
    return sorted(
        p for p in (root / "features.zarr" / "tiny@128" / array).rglob("*") if p.is_file() and p.name != "zarr.json"
    )


@pytest.mark.parametrize("damage", ["delete-features", "garble-features", "delete-valid", "garble-valid", "drop-array"])
def test_damaged_features_never_come_back_as_nan(tmp_path, damage):
    import shutil

    make_bank(tmp_path, [f"c{i}" for i in range(10)], templates=2)  # two category chunks (8 per chunk)
    array = "valid" if "valid" in damage else "pooled_8"
    chunk = _chunks(tmp_path, array)[0]
    if damage.startswith("delete"):
        chunk.unlink()
    elif damage.startswith("garble"):
        chunk.write_bytes(b"\x00garbage" * 7)
    else:
        shutil.rmtree(tmp_path / "features.zarr" / "tiny@128" / "pooled_16")
    with pytest.raises(UserError) as err:
        Bank(tmp_path).prototypes(["c0", "c9"], "tiny")
    message = str(err.value)
    assert "features.zarr/tiny@128" in message and "is damaged" in message
    assert f"dpseg bank encode {tmp_path} --encoder tiny --encode-size 128" in message


def test_an_old_schema_bank_is_refused_with_the_command_that_rebuilds_it(tmp_path):
    import json

    make_bank(tmp_path, ["cat"], templates=2)
    config = json.loads((tmp_path / "bank.json").read_text())
    config.update(schema=1, vocabularies=["voc-20"])
    (tmp_path / "bank.json").write_text(json.dumps(config))
    with pytest.raises(
        UserError,
        match="schema 1.*dpseg bank build --out NEW_FOLDER --generator tiny-sd --seed 0 "
        "--templates 2 --vocab voc-20 --encoder tiny",
    ):
        Bank(tmp_path)
