"""Text prompts are computed once per (encoder, weights, templates, class names) and read back."""

import pytest
import torch

from dpseg.clip.templates import templates
from dpseg.model import DPSegConfig, build_dpseg
from pipeline.text_cache import cached_text_embeddings, weights_identity

NAMES = ["red solid circle", "blue striped square", "building, edifice"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_dpseg(DPSegConfig(encoder="tiny", templates=3), weights=None)


def _files(root):
    return sorted(p.name for p in (root / "text").iterdir())


def test_first_call_stores_what_the_tower_computes_and_the_second_reads_it(model, tmp_path, monkeypatch):
    direct = model.text_encoder.encode_classes(NAMES, templates(3))
    first = cached_text_embeddings(model, NAMES, tmp_path)
    assert first.shape == (3, 3, 64) and first.dtype == torch.float32
    assert torch.allclose(first, direct)
    assert len(_files(tmp_path)) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(model.text_encoder, "encode_classes", fail)
    assert torch.equal(cached_text_embeddings(model, NAMES, tmp_path), first)


def test_the_key_follows_classes_templates_and_weights(model, tmp_path):
    cached_text_embeddings(model, NAMES, tmp_path)
    other_order = cached_text_embeddings(model, NAMES[::-1], tmp_path)
    fewer_templates = cached_text_embeddings(model, NAMES, tmp_path, templates=2)
    assert len(_files(tmp_path)) == 3
    assert fewer_templates.shape == (3, 2, 64)
    assert torch.allclose(other_order, cached_text_embeddings(model, NAMES, tmp_path).flip(0))
    other = build_dpseg(DPSegConfig(encoder="tiny", templates=3), weights=None)
    with torch.no_grad():  # other weights (random towers are always built under seed 0): another entry, other values
        other.text_encoder.clip.text_projection.mul_(-1.5)
    assert not torch.allclose(cached_text_embeddings(other, NAMES, tmp_path), other_order.flip(0))
    assert len(_files(tmp_path)) == 4


def test_weights_files_are_identified_by_their_bytes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    assert weights_identity(str(a)) == weights_identity(str(b))
    b.write_bytes(b"other bytes")
    assert weights_identity(str(a)) != weights_identity(str(b))
    assert weights_identity("laion2b_s29b_b131k_ft_soup") == "tag:laion2b_s29b_b131k_ft_soup"


def test_default_location_and_a_damaged_file_is_recomputed(model, tmp_path, monkeypatch):
    monkeypatch.setenv("DPSEG_CACHE", str(tmp_path / "env"))
    value = cached_text_embeddings(model, NAMES)
    [name] = _files(tmp_path / "env")
    path = tmp_path / "env" / "text" / name
    path.write_bytes(path.read_bytes()[:40])  # truncated by a crash of something else
    assert torch.allclose(cached_text_embeddings(model, NAMES), value)
    assert path.stat().st_size > 40
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
