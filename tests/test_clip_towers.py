"""The CLIP towers: registry, multi-scale features, dense/pooled embeddings, text prompts, weights."""

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dpseg.clip import ENCODERS, NUM_TEMPLATES, TEMPLATES, ImageTower, WeightsError, load_clip
from dpseg.clip.encoders import create_open_clip
from dpseg.clip.templates import primary_name, split_synonyms, templates
from dpseg.registry import UnknownNameError


def test_registered_encoders_name_their_open_clip_architecture():
    assert ENCODERS.get("convnext-b").open_clip_model == "convnext_base_w_320"
    assert ENCODERS.get("convnext-b").pretrained_tag == "laion_aesthetic_s13b_b82k"
    assert ENCODERS.get("convnext-l").open_clip_model == "convnext_large_d_320"
    assert ENCODERS.get("convnext-l").pretrained_tag == "laion2b_s29b_b131k_ft_soup"
    assert "tiny" in ENCODERS


def test_unknown_encoder_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown encoder 'convnext-xl'; known: convnext-b, convnext-l, tiny"):
        load_clip("convnext-xl", weights=None)


def test_templates_are_the_80_clip_imagenet_ones():
    assert NUM_TEMPLATES == 80 and len(set(TEMPLATES)) == 80
    assert TEMPLATES[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in TEMPLATES)
    assert templates(10) == TEMPLATES[:10]
    with pytest.raises(ValueError, match="between 1 and 80"):
        templates(81)


def test_synonyms_split_on_commas():
    assert split_synonyms("building, edifice") == ["building", "edifice"]
    assert primary_name("building, edifice") == "building"
    with pytest.raises(ValueError):
        split_synonyms(" , ")


def test_image_tower_reads_channels_and_strides_from_timm(tiny_towers):
    tower = tiny_towers.image
    assert tower.strides == [2, 4, 8, 16, 32]
    assert tower.channels == [32, 32, 48, 192, 96]  # timm test_resnet: its deep stem is a level too
    assert tower.embed_dim == 64
    features = tower(torch.randn(2, 3, 96, 128))
    for stride, channels in zip(tower.strides, tower.channels, strict=False):
        assert features.levels[stride].shape == (2, channels, 96 // stride, 128 // stride)
    assert features.dense.shape == (2, 64, 3, 4)


def test_dense_embedding_is_the_head_at_every_location(tiny_towers):
    tower = tiny_towers.image.eval()
    with torch.no_grad():
        features = tower(torch.randn(1, 3, 64, 64))
        last = features.levels[32]
        visual = tower.visual
        for i in range(last.shape[2]):
            for j in range(last.shape[3]):
                column = last[:, :, i : i + 1, j : j + 1]  # a 1x1 map: pooling is the identity
                expected = visual.head(visual.trunk.forward_head(column))
                assert torch.allclose(features.dense[:, :, i, j], expected, atol=1e-5)


# convnext-b has a linear head, convnext-l an MLP; tiny is a ResNet (no norm before its pooling)
def test_batchnorm_statistics_stay_frozen_while_the_tower_trains(tiny_towers):
    tower = copy.deepcopy(tiny_towers.image).train()
    norms = [m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert any(m.training for m in tower.modules())  # the rest trains (drop-path, dropout)
    before = [m.running_mean.clone() for m in norms]
    tower(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms, strict=True))


@pytest.mark.parametrize("trunk,proj", [("convnext_atto", "linear"), ("convnext_atto", "mlp"), ("resnet10t", "linear")])
def test_pooled_embedding_equals_open_clip_encode_image(trunk, proj):
    torch.manual_seed(1)
    clip = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"timm_model_name": trunk, "timm_pool": "", "timm_proj": proj, "image_size": 64},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    tower = ImageTower(clip.visual, image_size=64)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ours = tower.encode_prompts(images)
        expected = clip.encode_image(images)
        assert torch.allclose(ours.embedding, expected, atol=1e-5)
        levels = tower(images).levels
        for stride in (4, 8, 16):
            assert torch.allclose(ours.pooled[stride], levels[stride].mean(dim=(2, 3)), atol=1e-6)


def test_prompt_and_text_towers_are_frozen_and_image_tower_is_not(tiny_towers):
    assert all(p.requires_grad for p in tiny_towers.image.parameters())
    assert not any(p.requires_grad for p in tiny_towers.prompt.parameters())
    assert not any(p.requires_grad for p in tiny_towers.text.parameters())
    tiny_towers.prompt.train()
    tiny_towers.text.train()
    assert not tiny_towers.prompt.training  # a frozen tower stays in eval mode
    assert not tiny_towers.text.training and not tiny_towers.text.clip.transformer.training


def test_prompt_tower_starts_as_an_exact_copy_of_the_image_tower(tiny_towers):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = tiny_towers.image.eval().encode_prompts(images).embedding
        b = tiny_towers.prompt.encode_prompts(images).embedding
    assert torch.equal(a, b)
    image_weights = next(tiny_towers.image.visual.trunk.parameters())
    prompt_weights = next(tiny_towers.prompt.visual.trunk.parameters())
    assert torch.equal(image_weights, prompt_weights) and image_weights.data_ptr() != prompt_weights.data_ptr()


def test_text_prompts_average_synonyms_per_template(tiny_towers):
    text = tiny_towers.text
    out = text.encode_classes(["building, edifice", "cat"], templates(4))
    assert out.shape == (2, 4, 64)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 4), atol=1e-5)
    building = text.encode_texts([t.format("building") for t in templates(4)])
    edifice = text.encode_texts([t.format("edifice") for t in templates(4)])
    expected = F.normalize((building + edifice) / 2, dim=-1)
    assert torch.allclose(out[0], expected, atol=1e-5)
    cat = text.encode_texts([t.format("cat") for t in templates(4)])
    assert torch.allclose(out[1], cat, atol=1e-5)


def test_text_prompts_keep_templates_apart_and_use_all_80_by_default(tiny_towers):
    out = tiny_towers.text.encode_classes(["dog"])
    assert out.shape == (1, 80, 64)
    assert not torch.allclose(out[0, 0], out[0, 1])


def test_weights_round_trip_through_a_local_file_and_folder(tmp_path):
    torch.manual_seed(3)
    model, _ = create_open_clip(ENCODERS.get("tiny"), None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    images = torch.randn(1, 3, 64, 64)
    expected = model.eval().encode_image(images)
    for weights in (tmp_path, tmp_path / "open_clip_model.safetensors"):
        towers = load_clip("tiny", weights=weights)
        assert towers.weights == str(tmp_path / "open_clip_model.safetensors")
        with torch.no_grad():
            got = towers.prompt.encode_prompts(images).embedding
        assert torch.allclose(got, expected, atol=1e-5)


def test_bad_weights_give_one_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="no weights file in"):
        load_clip("tiny", weights=tmp_path)
    with pytest.raises(WeightsError, match="neither a file, a directory, nor an open_clip tag"):
        load_clip("tiny", weights=tmp_path / "missing.safetensors")
    corrupt = tmp_path / "open_clip_model.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="could not load the weights file .* --encoder-weights"):
        load_clip("tiny", weights=corrupt)


def test_default_hub_weights_fail_fast_offline_with_the_fix():
    # HF_HUB_OFFLINE=1 (conftest): the hub tag is not cached here, so loading must say what to pass
    expected = r"open_clip pretrained tag 'laion_aesthetic_s13b_b82k' \(a published-weights name, not a file\)"
    with pytest.raises(WeightsError, match=expected + r".*pass --encoder-weights"):
        load_clip("convnext-b")


def test_same_weights_compares_local_files_by_content_not_path(tmp_path):
    from dpseg.clip.encoders import same_weights

    a, b, c = tmp_path / "a.safetensors", tmp_path / "copy" / "a.safetensors", tmp_path / "c.safetensors"
    b.parent.mkdir()
    a.write_bytes(b"weights-1")
    b.write_bytes(b"weights-1")  # a `dvc exp run --temp` workspace holds a copy under another path
    c.write_bytes(b"weights-2")
    assert same_weights(a, b) and same_weights(str(a), str(a))
    assert not same_weights(a, c)
    assert not same_weights(a, tmp_path / "missing.safetensors")
    assert same_weights("random", "random") and not same_weights("random", "laion2b_s29b_b131k_ft_soup")


def test_same_weights_ignores_safetensors_metadata_but_not_tensors(tmp_path):
    from safetensors.torch import save_file

    from dpseg.clip.encoders import matches_recorded, same_weights

    tensors = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(2)}
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_file(tensors, old, metadata={"git_commit": "c964dd4"})
    save_file(tensors, new, metadata={"git_commit": "bbcfbc1", "note": "trained again"})
    assert old.read_bytes() != new.read_bytes()
    assert same_weights(old, new) and matches_recorded(new, old, "sha256-of-old")  # a bank built at another commit
    changed, retyped, renamed = (tmp_path / f"{n}.safetensors" for n in ("changed", "retyped", "renamed"))
    save_file({**tensors, "b": torch.tensor([1.0, 2.0])}, changed)
    save_file({**tensors, "b": torch.ones(2, dtype=torch.float64)}, retyped)
    save_file({"w": tensors["w"], "bias": tensors["b"]}, renamed)
    assert not any(same_weights(old, other) for other in (changed, retyped, renamed))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert not same_weights(old, junk)


def test_a_bank_whose_recorded_weights_file_is_gone_is_matched_by_its_recorded_digest(tmp_path):
    import hashlib

    from dpseg.clip.encoders import matches_recorded, weights_digest

    gone = tmp_path / "run-1" / "tiny.safetensors"  # DVC's run cache restored a bank built in a temp workspace
    here, other = tmp_path / "tiny.safetensors", tmp_path / "other.safetensors"
    here.write_bytes(b"weights-1")
    other.write_bytes(b"weights-2")
    digest = hashlib.sha256(b"weights-1").hexdigest()
    assert weights_digest(here) == digest and weights_digest("random") is None
    assert weights_digest("laion2b_s29b_b131k_ft_soup") is None
    assert matches_recorded(here, gone, digest)
    assert not matches_recorded(other, gone, digest)
    assert not matches_recorded(here, gone, None)  # an older bank without a digest: still refused
    gone.parent.mkdir()
    gone.write_bytes(b"weights-3")  # while the recorded file exists, its content decides
    assert not matches_recorded(here, gone, digest)
