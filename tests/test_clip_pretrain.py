"""The demo's CLIP pretraining: a few steps on a few templates (loss falls, the file loads into
load_clip, a seed fixes the result), and the loss/metric pieces against independent computations."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dpseg.data.shapes import COLOURS, SHAPES, SHAPES_CATEGORIES, TEXTURES
from pipeline.clip import pretrain as cp

FAST = dict(
    steps=8,
    batch_size=16,
    lr=2e-3,
    warmup=2,
    templates=2,
    templates_per_step=2,
    renders=1,
    eval_renders=1,
    small_size=32,
    small_fraction=1.0,
    seed=3,
    threads=1,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short run twice (same seed)."""
    out = {}
    for name, seed in (("a", 3), ("b", 3)):
        folder = tmp_path_factory.mktemp(name)
        metrics = cp.pretrain(cp.ClipPretrainSettings(**{**FAST, "seed": seed, "out": str(folder)}), progress=False)
        out[name] = (folder, metrics)
    return out


def test_loss_falls(runs):
    folder, _ = runs["a"]
    losses = [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == FAST["steps"]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses


def test_output_loads_into_load_clip(runs):
    from dpseg.clip import load_clip

    folder, metrics = runs["a"]
    path = folder / "tiny.safetensors"
    saved = load_file(str(path))
    towers = load_clip("tiny", weights=str(path))
    assert towers.weights == str(path)
    # the towers carry exactly the trained tensors (not a random init)
    assert torch.equal(towers.text.clip.token_embedding.weight, saved["token_embedding.weight"])
    assert torch.equal(towers.image.visual.head.proj.weight, saved["visual.head.proj.weight"])
    torch.manual_seed(0)
    random = load_clip("tiny", weights=None)
    assert not torch.equal(random.image.visual.head.proj.weight, saved["visual.head.proj.weight"])
    config = json.loads((folder / "config.json").read_text())
    assert config["config"]["steps"] == FAST["steps"] and config["open_clip_model"] == "dpseg-tiny-resnet"
    assert 0.0 <= metrics["zero_shot_accuracy"] <= 1.0 and metrics["images"] == 48 * FAST["templates"]
    assert json.loads((folder / "metrics.json").read_text())["zero_shot_accuracy"] == metrics["zero_shot_accuracy"]


def test_same_seed_same_weights(runs):
    a, b = (load_file(str(runs[k][0] / "tiny.safetensors")) for k in "ab")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert runs["a"][1]["zero_shot_accuracy"] == runs["b"][1]["zero_shot_accuracy"]
    assert (runs["a"][0] / "metrics.jsonl").read_text() == (runs["b"][0] / "metrics.jsonl").read_text()


def test_zero_shot_accuracy_against_loops():
    g = torch.Generator().manual_seed(0)
    images, classes = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    correct = 0
    for i in range(7):
        cos = [float(images[i] @ classes[c] / (images[i].norm() * classes[c].norm())) for c in range(4)]
        correct += int(max(range(4), key=lambda c: cos[c]) == int(labels[i]))
    assert cp.zero_shot_accuracy(images, classes, labels) == pytest.approx(correct / 7)
    # scaling an image vector never changes its nearest class (cosine)
    assert cp.zero_shot_accuracy(images * 3.0, classes, labels) == pytest.approx(correct / 7)


def test_attribute_marginals_against_loops():
    logits = torch.randn(2, len(SHAPES_CATEGORIES), generator=torch.Generator().manual_seed(1))
    marginal = cp.attribute_logits(logits)
    names = {"colour": list(COLOURS), "texture": list(TEXTURES), "shape": list(SHAPES)}
    for attribute, values in names.items():
        for v, value in enumerate(values):
            members = [i for i, name in enumerate(SHAPES_CATEGORIES) if value in name.split()]
            expected = torch.logsumexp(logits[:, members], dim=1)
            assert torch.allclose(marginal[attribute][:, v], expected, atol=1e-5)
    categories = torch.arange(len(SHAPES_CATEGORIES))
    targets = cp.attribute_targets(categories)
    for i, (c, t, s) in enumerate(itertools.product(range(4), range(3), range(4))):
        assert (targets["colour"][i], targets["texture"][i], targets["shape"][i]) == (c, t, s)


def test_short_tokens_give_open_clip_embeddings():
    import open_clip

    from dpseg.clip.encoders import ENCODERS, create_open_clip

    torch.manual_seed(0)
    model, _ = create_open_clip(ENCODERS.get("tiny"), weights=None)
    tokenizer = open_clip.get_tokenizer("dpseg-tiny-resnet")
    tokens = cp.caption_tokens(tokenizer, templates=5)
    assert tokens.shape[:2] == (48, 5) and tokens.shape[2] < 77
    texts = [t.format(name) for name in SHAPES_CATEGORIES[:3] for t in cp.TEMPLATES[:5]]
    with torch.no_grad():
        ours = cp.encode_tokens(model, tokens[:3].reshape(15, -1))
        theirs = model.encode_text(tokenizer(texts))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert F.cosine_similarity(ours, theirs).min() > 0.9999


def test_bad_settings_are_one_line_errors(cli, one_line_error, tmp_path):
    one_line_error(cli("clip", "pretrain", "--out", tmp_path, "--small-size", "40"), "small_size", "multiple of 32")
    one_line_error(cli("clip", "pretrain", "--out", tmp_path, "--device", "tpu"), "device", "cpu or cuda")
    one_line_error(cli("clip", "pretrain", "--out", tmp_path, "--photo-share", "1.5"), "photo_share", "[0, 1]")
    assert not (tmp_path / "tiny.safetensors").exists()
    with pytest.raises(Exception, match="unknown settings"):
        cp.ClipPretrainSettings.from_dict({"stepz": 3})


def test_a_photo_share_puts_the_last_renders_under_photo_conditions():
    from dpseg.clip.templates import TEMPLATES
    from dpseg.data.shapes import photo_conditions, render_prompt_image

    plain = cp.render_set(32, 2, 5, templates=1)
    mixed = cp.render_set(32, 2, 5, templates=1, photo_share=0.5)
    assert mixed.shape == plain.shape == (48, 1, 2, 32, 32, 3)
    assert (mixed[:, :, 0] == plain[:, :, 0]).all()  # the first render of each pair stays plain
    c = 7
    render = render_prompt_image(SHAPES_CATEGORIES[c], TEMPLATES[0], 32, 5 + 1)
    assert (mixed[c, 0, 1] == photo_conditions(render, 5, f"{c}/0/1")).all() and (mixed[c, 0, 1] != render).any()
    assert (cp.render_set(32, 2, 5, templates=1, photo_share=0.5) == mixed).all()  # seeded


def test_the_metrics_hold_the_zero_shot_accuracy_under_photo_conditions(runs):
    _, metrics = runs["a"]
    photo = metrics["photo"]
    assert 0.0 <= photo["zero_shot_accuracy"] <= 1.0 and set(photo["attribute_accuracy"]) == set(cp.ATTRIBUTES)
