"""`dpseg analyze gap`: the statistics against an independent computation, then the command on a
tiny synthetic dataset and bank (figures, data files, errors)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.analyze.gap import MODALITIES, gap_statistics, pca_2d


def _unit(v):
    return v / np.linalg.norm(v)


def reference_statistics(images, text, visual):
    """The definitions of docs/analyses.md, written out with plain loops in numpy."""
    p_count, m_count, _ = text.shape
    sims = {m: [] for m in MODALITIES}
    prompt_sum = {m: 0.0 for m in MODALITIES}
    image_sum = 0.0
    for p in range(p_count):
        x = _unit(images[p])
        image_sum = image_sum + x
        per = {m: [] for m in MODALITIES}
        for k in range(m_count):
            t, v = _unit(text[p, k]), _unit(visual[p, k])
            d = _unit((t + v) / 2)
            for name, vec in (("text", t), ("visual", v), ("dual", d)):
                per[name].append(float(x @ vec))
                prompt_sum[name] = prompt_sum[name] + vec
        for name in MODALITIES:
            sims[name].append(sum(per[name]) / m_count)
    image_centroid = image_sum / p_count
    distance = {m: float(np.linalg.norm(image_centroid - prompt_sum[m] / (p_count * m_count))) for m in MODALITIES}
    return sims, distance


def test_statistics_match_an_independent_computation():
    rng = np.random.default_rng(3)
    images, text, visual = rng.normal(size=(7, 5)), rng.normal(size=(7, 3, 5)), rng.normal(size=(7, 3, 5))
    stats = gap_statistics(torch.tensor(images), torch.tensor(text), torch.tensor(visual))
    sims, distance = reference_statistics(images, text, visual)
    assert stats["pairs"] == 7 and stats["templates"] == 3
    for m in MODALITIES:
        np.testing.assert_allclose(stats["similarity"][m].numpy(), sims[m], atol=1e-10)
        s = stats["summary"][m]
        assert s["mean_similarity"] == pytest.approx(np.mean(sims[m]), abs=1e-10)
        assert s["std_similarity"] == pytest.approx(np.std(sims[m]), abs=1e-10)
        assert s["min_similarity"] == pytest.approx(min(sims[m])) and s["max_similarity"] == pytest.approx(max(sims[m]))
        assert s["centroid_distance"] == pytest.approx(distance[m], abs=1e-10)
    assert stats["summary"]["visual_above_text"] == pytest.approx(np.mean(np.array(sims["visual"]) > sims["text"]))
    # scale-free: the definitions use directions only
    scaled = gap_statistics(torch.tensor(images) * 5, torch.tensor(text) * 0.1, torch.tensor(visual) * 3)
    assert scaled["summary"]["dual"]["centroid_distance"] == pytest.approx(distance["dual"], abs=1e-10)


def test_statistics_on_a_case_with_a_known_answer():
    # images equal their visual prompts, text prompts are orthogonal to both: cos 1, 0, and 1/sqrt(2) for dual
    eye = torch.eye(4)
    images = eye[:2]
    visual = images.unsqueeze(1).clone()
    text = eye[2:4].unsqueeze(1).clone()
    stats = gap_statistics(images, text, visual)
    np.testing.assert_allclose(stats["similarity"]["visual"].numpy(), [1, 1])
    np.testing.assert_allclose(stats["similarity"]["text"].numpy(), [0, 0], atol=1e-12)
    np.testing.assert_allclose(stats["similarity"]["dual"].numpy(), [1 / math.sqrt(2)] * 2)
    assert stats["summary"]["visual"]["centroid_distance"] == pytest.approx(0.0, abs=1e-12)
    # image centroid (.5, .5, 0, 0), text centroid (0, 0, .5, .5): distance 1
    assert stats["summary"]["text"]["centroid_distance"] == pytest.approx(1.0)
    assert stats["summary"]["visual_above_text"] == 1.0
    with pytest.raises(ValueError, match="prompts"):
        gap_statistics(images, text, visual[:1])


def test_pca_recovers_a_plane_and_is_deterministic():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(6, 2)))[0].T  # two orthonormal directions in 6-D
    coords = rng.normal(size=(30, 2)) * [3.0, 1.0]
    points = coords @ basis + 0.5
    mean, components, ratio = pca_2d(points)
    assert ratio.sum() == pytest.approx(1.0) and ratio[0] > ratio[1]
    projected = (points - mean) @ components.T
    np.testing.assert_allclose(projected @ components + mean, points, atol=1e-9)  # nothing lost
    again = pca_2d(points[::-1].copy())[1]
    np.testing.assert_allclose(again, components, atol=1e-9)  # sign fixed: same plot every run


# ---- the command -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny shapes dataset and a procedural bank for the classes its val images show most."""
    from bank.build import BuildSettings, build_bank
    from dpseg.data.readers import SegmentationDataset
    from dpseg.data.synth import write_shapes_benchmark

    root = tmp_path_factory.mktemp("gap")
    write_shapes_benchmark(root / "shapes", images=1, val_images=12, size=64, progress=False)
    data = SegmentationDataset(root / "shapes", "val")
    counts = np.zeros(data.num_classes, int)
    for i in range(len(data)):
        label = data.load(i)[1]
        counts += np.bincount(label[label != 255].ravel(), minlength=data.num_classes) > 0
    top = [data.class_names[c] for c in np.argsort(-counts, kind="stable")[:3]]
    (root / "vocab.txt").write_text("\n".join(top) + "\n")
    build_bank(
        BuildSettings(
            out=root / "bank",
            generator="procedural",
            vocab=[str(root / "vocab.txt")],
            encoder="tiny",
            encoder_weights=None,
            templates=2,
            progress=False,
        )
    )
    return root, top


def test_gap_command_writes_summary_pairs_and_both_figures(world, cli):
    root, top = world
    out = root / "out"
    args = [
        "analyze",
        "gap",
        "--bank",
        root / "bank",
        "--encoder",
        "tiny",
        "--images",
        root / "shapes",
        "--classes",
        ", ".join(top),
        "--samples",
        12,
        "--min-area",
        0.005,
        "--no-progress",
    ]
    result = cli(*args, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "gap.json").read_text())
    from bank.reader import Bank

    assert 2 <= summary["pairs"] <= 12 and summary["templates"] == 2
    assert summary["bank"]["encode_size"] == Bank(root / "bank").encode_size("tiny")
    assert summary["bank"]["weights"] == "random"
    assert summary["paper_centroid_distance"] == {"dual": 0.18, "visual": 0.33, "text": 0.39}
    rows = list(csv.DictReader(open(out / "pairs.csv")))
    assert len(rows) == summary["pairs"] and {r["class"] for r in rows} <= set(top)
    for m in MODALITIES:
        sims = [float(r[f"sim_{m}"]) for r in rows]
        assert all(-1 <= s <= 1 for s in sims)
        assert summary["summary"][m]["mean_similarity"] == pytest.approx(np.mean(sims), abs=1e-5)
        assert summary["centroid_distance"][m] == summary["summary"][m]["centroid_distance"]
        assert 0 <= summary["centroid_distance"][m] <= 2
    for figure in ("similarity_histogram", "embedding_pca"):
        with Image.open(out / f"{figure}.png") as image:
            assert image.format == "PNG" and min(image.size) > 100
    hist = json.loads((out / "similarity_histogram.json").read_text())
    assert {m: sum(c) for m, c in hist["counts"].items()} == {m: summary["pairs"] for m in MODALITIES}
    emb = json.loads((out / "embedding_pca.json").read_text())
    assert len(emb["points"]["image"]) == summary["pairs"] and len(emb["points"]["text"]) == summary["classes"]


def test_pairs_are_sampled_deterministically_from_qualifying_regions(world, tmp_path, monkeypatch):
    from pipeline.analyze.gap import open_dataset, resolve_classes, sample_pairs

    root, top = world
    (tmp_path / "out" / "data").mkdir(parents=True)
    (tmp_path / "out" / "data" / "shapes").symlink_to(root / "shapes")
    monkeypatch.chdir(tmp_path)  # a dataset name is looked up where the pipeline prepares it
    assert open_dataset("shapes", None).info.root.resolve() == (root / "shapes").resolve()
    data = open_dataset(str(root / "shapes"), None)
    ids = resolve_classes(data, ", ".join(top))
    assert [data.class_names[i] for i in ids] == top
    assert resolve_classes(data, "unseen+1,2") == [*data.info.extra["unseen_ids"], 1, 2]  # a union of subsets
    pairs = sample_pairs(data, ids, 100, 0.005, seed=0)
    assert pairs == sample_pairs(data, ids, 100, 0.005, seed=0) and pairs[:3] == sample_pairs(data, ids, 3, 0.005, 0)
    assert sample_pairs(data, ids, 100, 0.005, seed=1) != pairs  # the seed orders the items
    for index, c, area in pairs:
        label = data.load(index)[1]
        assert c in ids and area == int((label == c).sum()) >= 0.005 * label.size
    assert len({(i, c) for i, c, _ in pairs}) == len(pairs)


def test_gap_errors_are_one_line(world, cli, one_line_error):
    root, top = world
    base = ["analyze", "gap", "--bank", root / "bank", "--encoder", "tiny", "-o", root / "bad"]
    one_line_error(cli(*base, "--images", root / "nowhere"), "not a prepared dataset", "dpseg data synth")
    one_line_error(cli(*base, "--images", root / "shapes", "--classes", "purple unicorn"), "purple unicorn")
    one_line_error(cli(*base, "--images", root / "shapes", "--encoder-weights", root / "w.safetensors"), "weights")
    one_line_error(cli(*base, "--images", root / "shapes", "--min-area", 0.99), "--min-area")
    assert sorted(json.loads((root / "bank" / "bank.json").read_text())["categories"]) == sorted(top)
    all_classes = cli(*base, "--images", root / "shapes", "--classes", "all", "--min-area", 0.005)
    one_line_error(all_classes, "no 'tiny' prompts")  # the bank holds 3 of the 48
    assert not (root / "bad" / "gap.json").exists()


def test_given_weights_load_when_they_match_the_digest_of_a_recorded_file_that_is_gone(tmp_path):
    from safetensors.torch import save_file

    from dpseg.clip.encoders import ENCODERS, create_open_clip, weights_digest
    from dpseg.errors import UserError
    from pipeline.analyze.gap import load_towers

    torch.manual_seed(3)  # not seed 0: these weights differ from the random towers
    model, _ = create_open_clip(ENCODERS.get("tiny"), weights=None)
    here = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(here))
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not these weights")
    info = {"weights": str(tmp_path / "gone" / "tiny.safetensors"), "weights_sha256": weights_digest(here)}

    towers = load_towers("tiny", info, str(here), "cpu")
    loaded = dict(towers.prompt.named_parameters())
    name, value = next((n, v) for n, v in model.visual.named_parameters() if v.ndim == 4)
    assert any(torch.equal(p, value) for p in loaded.values()), name  # the given file's weights, not random ones
    with pytest.raises(UserError, match="encoded with weights"):
        load_towers("tiny", info, str(other), "cpu")
