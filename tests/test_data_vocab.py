"""Vocabularies: counts, order, agreement with ADE's own class file, custom files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpseg.clip.templates import primary_name, split_synonyms
from dpseg.data.vocab import VOCABULARIES, load_vocab, vocab_names
from dpseg.errors import UserError
from dpseg.registry import UnknownNameError

REALSEG = Path(__file__).resolve().parent / "fixtures" / "realseg"  # in the repository: a bare clone tests
EXPECTED = {"coco-stuff": 171, "ade-150": 150, "ade-847": 847, "pc-59": 59, "pc-459": 459, "voc-20": 20}


@pytest.mark.parametrize("name,count", sorted(EXPECTED.items()))
def test_public_vocabulary_counts_and_unique_names(name, count):
    names = load_vocab(name)
    assert len(names) == count
    assert len(set(names)) == count
    assert all(split_synonyms(n) for n in names)


def test_registry_holds_the_six_and_shapes():
    assert set(vocab_names()) == set(EXPECTED) | {"shapes", "shapes-background"}
    assert vocab_names() == VOCABULARIES.names()
    assert len(load_vocab("shapes")) == 48
    assert load_vocab("shapes-background") == [*load_vocab("shapes"), "background"]


def test_label_order_matches_the_published_lists():
    coco = load_vocab("coco-stuff")
    assert coco[:3] == ["person", "bicycle", "car"] and coco[-1] == "wood"
    assert coco.index("banner") == 80  # the 80 things first, then the 91 stuff classes
    voc = load_vocab("voc-20")
    assert voc == [
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    ]
    assert load_vocab("ade-847")[:3] == ["wall", "building, edifice", "sky"]
    assert load_vocab("pc-459")[:3] == ["accordion", "aeroplane", "airconditioner"]
    assert load_vocab("pc-59")[-1] == "wood"


def test_ade150_agrees_with_objectinfo150():
    """SED's A-150 list keeps one synonym per class; it must be one of the synonyms that
    ADE's own objectInfo150.txt gives at the same index."""
    lines = (REALSEG / "ade20k" / "objectInfo150.txt").read_text().splitlines()[1:]
    official = [line.split("\t")[4] for line in lines]
    ours = load_vocab("ade-150")
    assert len(official) == len(ours) == 150
    for index, (name, reference) in enumerate(zip(ours, official, strict=False)):
        synonyms = [s.strip() for s in reference.split(",")]
        assert primary_name(name) in synonyms, (index, name, reference)


def test_shared_bank_needs_1166_distinct_primary_names():
    # DESIGN.md: 1,706 class entries, 1,166 distinct primary names across the six lists
    all_names = [n for name in EXPECTED for n in load_vocab(name)]
    assert len(all_names) == 1706
    assert len({primary_name(n) for n in all_names}) == 1166


def test_custom_vocabulary_from_txt_and_json(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("# my classes\ncat\n\ndog, puppy\n")
    assert load_vocab(str(txt)) == ["cat", "dog, puppy"]
    js = tmp_path / "mine.json"
    js.write_text(json.dumps(["sky", "tree"]))
    assert load_vocab(str(js)) == ["sky", "tree"]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as err:
        load_vocab("ade-151")
    message = str(err.value)
    assert "ade-151" in message and "ade-150" in message and "voc-20" in message
    assert isinstance(err.value, UserError)


@pytest.mark.parametrize(
    "content,needle",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"a": 1}), "list of class-name strings"),
        ("[]", "no class names"),
        (json.dumps(["a", "a"]), "appears twice"),
        (json.dumps(["a", " , "]), "empty class name"),
    ],
)
def test_bad_vocabulary_files_are_user_errors(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=needle):
        load_vocab(str(path))


def test_missing_vocabulary_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_vocab(str(tmp_path / "nope.txt"))


def test_cli_vocab_list_json_and_show(cli):
    result = cli("data", "vocab", "list", "--json")
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    assert {k: counts[k] for k in EXPECTED} == EXPECTED
    shown = cli("data", "vocab", "show", "voc-20", "--json")
    assert json.loads(shown.output) == load_vocab("voc-20")
    plain = cli("data", "vocab", "show", "voc-20")
    assert plain.output.splitlines()[0].split() == ["0", "aeroplane"]


def test_cli_unknown_vocab_is_one_error_line(cli, one_line_error):
    one_line_error(cli("data", "vocab", "show", "nope"), "unknown vocabulary 'nope'")


def test_names_are_nfc_normalised_so_one_word_typed_two_ways_is_one_class(tmp_path):
    from bank.plan import resolve_categories

    composed, decomposed = "na\u00efve art", "nai\u0308ve art"
    assert composed != decomposed
    (tmp_path / "a.txt").write_text(decomposed + "\n", "utf-8")
    (tmp_path / "b.json").write_text(json.dumps([composed, "cat"]), "utf-8")
    assert load_vocab(str(tmp_path / "a.txt")) == [composed]
    assert primary_name(decomposed + ", naive") == composed
    categories, _ = resolve_categories([str(tmp_path / "a.txt"), str(tmp_path / "b.json")])
    assert categories == [composed, "cat"]
    (tmp_path / "both.txt").write_text(f"{composed}\n{decomposed}\n", "utf-8")
    with pytest.raises(UserError, match="appears twice"):
        load_vocab(str(tmp_path / "both.txt"))
