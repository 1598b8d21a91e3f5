"""The demo world's settings: the canvas as a class, photo scenes unlike the bank's clean studio
prompts, and the training option that shows the decoder crop prompts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dpseg.data import shapes
from dpseg.errors import UserError


def test_the_canvas_is_a_class_when_asked_and_ignore_otherwise():
    allowed = list(range(48))
    image, label = shapes.render_scene(64, 0, "k", allowed, background=48)
    plain_image, plain_label = shapes.render_scene(64, 0, "k", allowed)
    assert np.array_equal(image, plain_image)  # the same picture, only the labels differ
    assert 255 not in np.unique(label) and 48 in np.unique(label)
    assert np.array_equal(label == 48, plain_label == 255)
    assert shapes.WORLD_CATEGORIES[48] == shapes.BACKGROUND and shapes.WORLD_CATEGORIES[:48] == shapes.SHAPES_CATEGORIES


def test_photo_scenes_are_deterministic_and_change_pixels_not_objects():
    allowed = list(range(48))
    a = shapes.render_scene(96, 1, "k", allowed, background=48, style="photo")
    b = shapes.render_scene(96, 1, "k", allowed, background=48, style="photo")
    plain = shapes.render_scene(96, 1, "k", allowed, background=48)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], plain[0])
    # clutter is canvas: a scene of one allowed class holds that class and the canvas only
    one = shapes.render_scene(96, 2, "k", [5], background=48, style="photo")[1]
    assert set(np.unique(one).tolist()) <= {5, 48}
    with pytest.raises(ValueError, match="style must be one of"):
        shapes.render_scene(64, 0, "k", allowed, style="foggy")


def test_studio_prompts_are_centred_on_a_flat_backdrop_and_the_background_prompt_has_no_object():
    img = shapes.render_prompt_image("red solid square", "a photo of a {}.", 64, 0, look="studio").astype(float)
    backdrop = np.asarray(shapes._BACKGROUNDS["studio"], float)
    obj = np.abs(img - backdrop).sum(-1) > 60
    ys, xs = np.nonzero(obj)
    assert abs(ys.mean() - 31.5) < 4 and abs(xs.mean() - 31.5) < 4
    assert np.abs(img[~obj] - backdrop).max() < 40  # flat, unlike the scenes' photo canvas
    canvas = shapes.render_prompt_image(shapes.BACKGROUND, "a photo of a {}.", 64, 0, look="studio").astype(float)
    saturation = canvas.max(-1) - canvas.min(-1)
    assert saturation.max() < 40  # a grey canvas: no coloured object
    scene_look = shapes.render_prompt_image("red solid square", "a photo of a {}.", 64, 0)
    assert not np.array_equal(scene_look, img.astype(np.uint8))


def test_procedural_studio_is_a_registered_generator_with_its_own_identity():
    from bank.generators.base import create_generator

    studio, plain = create_generator("procedural-studio"), create_generator("procedural")
    assert studio.settings["look"] == "studio" and studio.settings_hash != plain.settings_hash


def test_synth_with_background_writes_the_world_vocabulary(tmp_path):
    from dpseg.data.layout import read_layout
    from dpseg.data.synth import write_shapes_benchmark
    from dpseg.data.vocab import load_vocab

    write_shapes_benchmark(tmp_path / "w", images=2, val_images=2, size=32, background=True, scene_style="photo")
    layout = read_layout(tmp_path / "w")
    assert layout.vocabulary == "shapes-background" and layout.num_classes == 49
    assert load_vocab("shapes-background")[48] == "background"
    assert 48 in layout.extra["seen_ids"] and 48 not in layout.extra["unseen_ids"]
    assert layout.extra["background_ids"] == [48]
    with pytest.raises(UserError, match="scene style 'fog'"):
        write_shapes_benchmark(tmp_path / "x", images=1, size=32, scene_style="fog")


def test_the_demo_profile_uses_the_gap_world_and_500_val_images_and_no_crop_training():
    from pipeline.profiles import PROFILES

    demo = PROFILES.get("demo")
    data = demo.defaults("data")
    assert data["val_images"] >= 500 and data["background"] and data["scene_style"] == "photo"
    assert demo.defaults("bank")["generator"] == "procedural-studio"
    for name in ("paper-b", "paper-l"):  # the extension stays out of the paper's profiles
        assert PROFILES.get(name).defaults("train").get("crop_prompts", 0.0) == 0.0
    assert demo.defaults("train")["crop_prompts"] > 0 and demo.defaults("train")["crop_negatives"] > 0
    assert demo.defaults("train")["model_overrides"] == {"crop_channels": True}  # the demo's decoder marks crops
    for name in ("paper-b", "paper-l"):
        assert "crop_channels" not in PROFILES.get(name).defaults("train").get("model_overrides", {})


def test_the_unseen_set_holds_its_canvas_class_exactly_when_the_canvas_is_labelled(tmp_path):
    from dpseg.data.layout import read_layout
    from dpseg.data.subsets import remap_labels, resolve_subset
    from dpseg.data.synth import write_shapes_benchmark
    from pipeline.profiles import eval_set, resolve

    classes = eval_set(resolve({"profile": "demo"}), "unseen")["classes"]
    write_shapes_benchmark(tmp_path / "w", images=1, val_images=1, size=32, background=True)
    write_shapes_benchmark(tmp_path / "plain", images=1, val_images=1, size=32)
    labelled, ignored = read_layout(tmp_path / "w"), read_layout(tmp_path / "plain")
    assert resolve_subset(labelled, classes) == [*shapes.UNSEEN_IDS, 48]
    assert resolve_subset(ignored, classes) == list(shapes.UNSEEN_IDS)  # no canvas class: it stays ignored
    # the canvas is counted as the set's last class; seen objects are ignored as before
    seen_object = shapes.SEEN_IDS[0]
    label = np.array([[48, shapes.UNSEEN_IDS[1], seen_object, 255]])
    keep = resolve_subset(labelled, classes)
    assert remap_labels(label, keep, 49, 255).tolist() == [[12, 1, 255, 255]]


def test_class_subsets_join_with_plus_and_refuse_unknown_parts_and_repeats(tmp_path):
    from dpseg.data.layout import read_layout
    from dpseg.data.subsets import resolve_subset
    from dpseg.data.synth import write_shapes_benchmark

    write_shapes_benchmark(tmp_path / "w", images=1, val_images=1, size=32, background=True)
    info = read_layout(tmp_path / "w")
    assert resolve_subset(info, "unseen+3,5") == [*shapes.UNSEEN_IDS, 3, 5]
    assert sorted(resolve_subset(info, "seen+unseen")) == list(range(49))
    with pytest.raises(UserError, match="declares no class subset 'rare'.*joined by '\\+'"):
        resolve_subset(info, "unseen+rare")
    with pytest.raises(UserError, match="must list distinct ids"):
        resolve_subset(info, "seen+background")  # the canvas is already a seen class


def crop_world(num_classes: int):
    """A random tiny model, random bank prompts (4 templates) for `num_classes` classes, and two
    64 px images: class 1 fills the top half of image 0 (2048 pixels), image 1 is all ignore."""
    from dpseg.model import DPSegConfig, build_dpseg
    from dpseg.model.prompts import VisualPrompts

    torch.manual_seed(0)
    model = build_dpseg(DPSegConfig(encoder="tiny", templates=4), weights=None)
    g = torch.Generator().manual_seed(0)
    tower = model.prompt_encoder
    pooled = {s: torch.randn(num_classes, 4, tower.channels_at(s), generator=g) for s in (4, 8, 16)}
    visual = VisualPrompts(torch.randn(num_classes, 4, tower.embed_dim, generator=g), pooled)
    images = torch.rand(2, 3, 64, 64)
    labels = torch.full((2, 64, 64), 255)
    labels[0, :32] = 1
    return model, visual, images, labels


def test_crop_prompt_training_replaces_a_share_of_the_present_classes_slots():
    from dpseg.refine import mixed_slots
    from pipeline.train.loop import crop_prompt_visual

    model, visual, images, labels = crop_world(3)
    out = crop_prompt_visual(model, images, labels, visual, 0.5, 64, 255)
    slots = mixed_slots(4, 0.5)
    assert torch.equal(out.embedding[0, 1, ~slots], visual.embedding[1, ~slots])
    assert not torch.allclose(out.embedding[0, 1, slots], visual.embedding[1, slots])
    assert torch.equal(out.embedding[0, [0, 2]], visual.embedding[[0, 2]]) and torch.equal(
        out.embedding[1], visual.embedding
    )


def test_crop_prompts_outside_zero_one_is_a_one_line_error():
    from pipeline.train.loop import TrainSettings
    from pipeline.train.resolve import check_numbers

    with pytest.raises(UserError, match="--crop-prompts is a share"):
        check_numbers(TrainSettings(dataset="d", crop_prompts=1.5, crop_size=64))


def test_crop_negatives_give_absent_classes_a_present_class_crop_and_are_seeded():
    from dpseg.refine import mixed_slots
    from pipeline.train.loop import crop_prompt_visual

    model, visual, images, labels = crop_world(6)  # image 1 has nothing present, so no negatives either

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return crop_prompt_visual(model, images, labels, visual, 0.5, 64, 255, negatives=2, generator=gen)

    out, again = run(7), run(7)
    assert torch.equal(out.embedding, again.embedding)
    slots = mixed_slots(4, 0.5)
    changed = [c for c in range(6) if not torch.equal(out.embedding[0, c], visual.embedding[c])]
    assert 1 in changed and len(changed) == 3  # the present class and two absent ones
    for c in changed:  # every changed class carries class 1's crop in the mixed slots, the bank elsewhere
        assert torch.equal(out.embedding[0, c, slots], out.embedding[0, 1, slots])
        assert torch.equal(out.embedding[0, c, ~slots], visual.embedding[c, ~slots])
        for s in (4, 8, 16):
            assert torch.equal(out.pooled[s][0, c, slots], out.pooled[s][0, 1, slots])
    assert torch.equal(out.embedding[1], visual.embedding)
    picks = {
        tuple(c for c in range(6) if not torch.equal(run(s).embedding[0, c], visual.embedding[c])) for s in range(8)
    }
    assert len(picks) > 1  # the generator, not a fixed rule, picks the absent classes


def test_similar_classes_ranks_the_other_classes_by_bank_prototype_cosine():
    from dpseg.model.prompts import VisualPrompts
    from pipeline.train.loop import similar_classes

    # class prototypes along known directions: 0 ~ 1 (close), 2 orthogonal, 3 opposite to 0
    axes = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    embedding = axes[:, None, :].repeat(1, 4, 1) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)  # norms differ
    nearest = similar_classes(VisualPrompts(embedding, {}))
    assert nearest.shape == (4, 3)
    assert nearest[0].tolist() == [1, 2, 3] and nearest[3].tolist() == [2, 1, 0]
    assert all(c not in row.tolist() for c, row in enumerate(nearest))  # never the class itself


def test_similar_crop_negatives_go_to_absent_classes_near_the_crop_class():
    from dpseg.model.prompts import VisualPrompts
    from dpseg.refine import Refinement
    from pipeline.train.loop import false_detections, similar_classes

    torch.manual_seed(0)
    n = 12
    embedding = torch.randn(n, 3, 8)
    nearest = similar_classes(VisualPrompts(embedding, {}))
    ref = Refinement(
        torch.tensor([2, 7]), torch.tensor([90, 80]), torch.tensor([1, 1]), torch.randn(2, 8), {4: torch.randn(2, 5)}
    )
    seen = set()
    for seed in range(20):
        out = false_detections(ref, n, 2, torch.Generator().manual_seed(seed), nearest)
        added, rows = out.classes[2:].tolist(), out.embedding[2:]
        assert added == sorted(added) and len(set(added)) == 2 and not set(added) & {2, 7}
        for c, row in zip(added, rows, strict=True):
            source = 0 if torch.equal(row, ref.embedding[0]) else 1
            assert torch.equal(row, ref.embedding[source])  # a present class's crop, unchanged
            pool = [x for x in nearest[[2, 7][source]].tolist() if x not in (2, 7)][:4]
            assert c in pool  # among the classes nearest the crop's class (3, and one taken already)
        seen.add(tuple(added))
    assert len(seen) > 1  # drawn by the generator
    again = false_detections(ref, n, 2, torch.Generator().manual_seed(3), nearest)
    assert torch.equal(again.classes, false_detections(ref, n, 2, torch.Generator().manual_seed(3), nearest).classes)


def test_random_crop_negatives_keep_their_draws():
    """The demo's default picks: the same generator calls as before `crop_negative_classes`
    existed (one permutation, then the sources), so its checkpoints keep their bytes."""
    from dpseg.refine import Refinement
    from pipeline.train.loop import false_detections

    ref = Refinement(torch.tensor([1, 4]), torch.tensor([9, 9]), torch.tensor([1, 1]), torch.randn(2, 3), {})
    out = false_detections(ref, 10, 3, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    absent = [0, 2, 3, 5, 6, 7, 8, 9]
    picked = sorted(absent[i] for i in torch.randperm(8, generator=gen)[:3].tolist())
    sources = torch.randint(2, (3,), generator=gen)
    assert out.classes[2:].tolist() == picked
    assert torch.equal(out.embedding[2:], ref.embedding[sources])


def test_crop_present_share_leaves_some_present_classes_with_the_bank_prompts():
    from dpseg.refine import Refinement
    from pipeline.train.loop import missed_detections

    # classes 1..6 present (two crops for class 3), 8 and 9 false detections (area 0)
    classes = torch.tensor([1, 2, 3, 4, 5, 6, 8, 9])
    counts = torch.tensor([1, 1, 2, 1, 1, 1, 1, 1])
    areas = torch.tensor([70, 80, 90, 100, 110, 120, 0, 0])
    embedding = torch.arange(9, dtype=torch.float32).view(9, 1)
    ref = Refinement(classes, areas, counts, embedding, {4: embedding * 10})
    kept_sets = set()
    for seed in range(30):
        out = missed_detections(ref, 0.5, torch.Generator().manual_seed(seed))
        kept = out.classes.tolist()
        assert {8, 9} <= set(kept)  # false detections always keep their crop
        rows = [
            r
            for c, n, start in zip(classes.tolist(), counts.tolist(), [0, 1, 2, 4, 5, 6, 7, 8], strict=True)
            if c in kept
            for r in range(start, start + n)
        ]
        assert out.embedding.flatten().tolist() == [float(r) for r in rows]  # each kept class keeps its crops
        assert torch.equal(out.pooled[4], out.embedding * 10)
        kept_sets.add(tuple(kept))
    assert len(kept_sets) > 5
    everyone = missed_detections(ref, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(everyone.classes, classes) and torch.equal(everyone.embedding, embedding)


def test_crop_prompt_images_leave_the_other_images_with_the_bank_prompts():
    from pipeline.train.loop import crop_prompt_visual

    model, visual, images, labels = crop_world(3)
    labels[1, 32:] = 2  # both images now have a present class
    changed = []
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        out = crop_prompt_visual(model, images, labels, visual, 0.5, 64, 255, generator=gen, image_share=0.5)
        changed.append(tuple(not torch.equal(out.embedding[b], visual.embedding) for b in range(2)))
    for b in range(2):  # each image gets crops under some seeds and keeps the bank's under others
        assert {c[b] for c in changed} == {True, False}
    everyone = crop_prompt_visual(model, images, labels, visual, 0.5, 64, 255)
    assert all(not torch.equal(everyone.embedding[b], visual.embedding) for b in range(2))


def test_crop_negatives_need_crop_prompts():
    from pipeline.train.loop import TrainSettings
    from pipeline.train.resolve import check_numbers

    with pytest.raises(UserError, match="set --crop-prompts too"):
        check_numbers(TrainSettings(dataset="d", crop_negatives=2, crop_size=64))
    with pytest.raises(UserError, match="--crop-negatives counts"):
        check_numbers(TrainSettings(dataset="d", crop_prompts=0.5, crop_negatives=-1, crop_size=64))
    with pytest.raises(UserError, match="--crop-prompt-images is a share"):
        check_numbers(TrainSettings(dataset="d", crop_prompts=0.5, crop_prompt_images=0.0, crop_size=64))
    with pytest.raises(UserError, match="--crop-negative-classes 'hard' is not one of random, similar"):
        check_numbers(TrainSettings(dataset="d", crop_prompts=0.5, crop_negatives=2, crop_negative_classes="hard"))
    with pytest.raises(UserError, match="--crop-present-share is a share"):
        check_numbers(TrainSettings(dataset="d", crop_prompts=0.5, crop_present_share=0.0, crop_size=64))
    with pytest.raises(UserError, match="--crop-present-share thins"):
        check_numbers(TrainSettings(dataset="d", crop_present_share=0.5, crop_size=64))
    with pytest.raises(UserError, match="set --crop-negatives too"):
        check_numbers(TrainSettings(dataset="d", crop_prompts=0.5, crop_negative_classes="similar", crop_size=64))


def test_crop_prompts_from_trains_the_first_share_of_the_steps_on_bank_prompts_alone():
    from pipeline.train.loop import TrainSettings, crop_prompts_active

    def active(**kw):
        recipe = TrainSettings(dataset="d", steps=10, **kw)
        return [step for step in range(10) if crop_prompts_active(recipe, step)]

    assert active(crop_prompts=0.5) == list(range(10))  # the default: from the first step
    assert active(crop_prompts=0.5, crop_prompts_from=0.75) == [8, 9]  # ceil(7.5) = 8 steps first
    assert active(crop_prompts=0.5, crop_prompts_from=0.5) == [5, 6, 7, 8, 9]
    assert active() == []  # no crop prompts at all


def test_crop_prompts_from_is_a_share_below_one_and_needs_crop_prompts():
    from pipeline.train.loop import TrainSettings
    from pipeline.train.resolve import check_numbers

    with pytest.raises(UserError, match=r"--crop-prompts-from is the share of the steps .* in \[0, 1\); got 1.0"):
        check_numbers(TrainSettings(dataset="d", crop_prompts=0.5, crop_prompts_from=1.0, crop_size=64))
    with pytest.raises(UserError, match="--crop-prompts-from says when --crop-prompts begin"):
        check_numbers(TrainSettings(dataset="d", crop_prompts_from=0.5, crop_size=64))
    check_numbers(TrainSettings(dataset="d", crop_prompts=0.5, crop_prompts_from=0.75, crop_size=64))


def test_the_demo_clip_has_seen_photographs_of_its_world_and_the_paper_profiles_train_none():
    from pipeline.profiles import PROFILES

    assert PROFILES.get("demo").defaults("clip")["photo_share"] == 0.5
    for name in ("paper-b", "paper-l"):  # real CLIP weights: no pretraining stage runs
        assert not PROFILES.get(name).defaults("clip")["enabled"]


def test_crops_from_the_prediction_are_cut_where_the_prediction_puts_each_class():
    from dpseg.refine import mixed_slots
    from pipeline.train.loop import crop_prompt_visual

    model, visual, images, labels = crop_world(3)  # the labels put class 1 in image 0's top half
    predicted = torch.full((2, 64, 64), 0)
    predicted[0, 32:] = 2  # the prediction puts class 2 in image 0's bottom half
    out = crop_prompt_visual(model, images, labels, visual, 0.5, 64, 255, detections=predicted)
    slots = mixed_slots(4, 0.5)
    assert out.crops[0, 2].tolist() == slots.tolist() and out.crops[0, 0].tolist() == slots.tolist()
    assert not out.crops[0, 1].any()  # the labelled class has no detection: it keeps the bank's prompts
    assert out.crops[1, 0].tolist() == slots.tolist() and not out.crops[1, 1:].any()  # image 1: all class 0
    truth = crop_prompt_visual(model, images, labels, visual, 0.5, 64, 255)
    assert truth.crops[0, 1].tolist() == slots.tolist() and int(truth.crops.sum()) == int(slots.sum())


def test_crop_source_is_truth_or_prediction_and_needs_crop_prompts():
    from pipeline.train.loop import TrainSettings
    from pipeline.train.resolve import check_numbers

    with pytest.raises(UserError, match="--crop-source 'labels' is not one of truth, prediction"):
        check_numbers(TrainSettings(dataset="d", crop_prompts=0.5, crop_source="labels", crop_size=64))
    with pytest.raises(UserError, match="--crop-source says where --crop-prompts' crops are cut from"):
        check_numbers(TrainSettings(dataset="d", crop_source="prediction", crop_size=64))
    check_numbers(TrainSettings(dataset="d", crop_prompts=0.5, crop_source="prediction", crop_size=64))


def test_training_with_every_crop_variant_runs_and_records_them_with_the_marked_decoder(tmp_path_factory):
    from test_train_world import recipe, shared_world

    from dpseg.model import load_dpseg
    from pipeline.train.loop import read_metrics, train

    data, bank = shared_world(tmp_path_factory)
    out = tmp_path_factory.mktemp("own-crops") / "out"
    r = recipe(data, bank, out, steps=3, checkpoint_every=0, crop_prompts=0.5, crop_source="prediction")
    r.crop_negatives, r.crop_negative_classes, r.crop_present_share = 2, "similar", 0.7
    r.model_overrides = {"crop_channels": True}
    train(r, progress=False)
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    model = load_dpseg(out / "checkpoint")
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    recorded = config["extra"]["recipe"]
    assert model.cfg.crop_channels and recorded["crop_source"] == "prediction"
    assert (recorded["crop_negative_classes"], recorded["crop_present_share"]) == ("similar", 0.7)
