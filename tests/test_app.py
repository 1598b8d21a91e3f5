"""The app's functions without a browser: the shared loaded-model session (against the model
called directly), prompt kinds, the Run view (overlays, legend, pass-II gallery, cost maps),
one-line errors for bad input, `dpseg segment` over a folder with one model load, `bench app`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.app.runner import TILE, AppRunner, parse_page_classes
from pipeline.evaluate.session import SegmentSession

BANKED = ["red solid circle", "blue solid square"]


@pytest.fixture(scope="module")
def session(app_world):
    return SegmentSession(app_world / "ckpt", device="cpu")


@pytest.fixture(scope="module")
def runner(session):
    return AppRunner(session, max_classes=50)


def picture(app_world) -> np.ndarray:
    return np.asarray(Image.open(app_world / "picture.png").convert("RGB"))


def test_session_predictions_equal_the_model_called_directly(app_world, session):
    from bank.reader import Bank
    from dpseg.metrics import predict_labels
    from dpseg.refine import RefineSettings, refine_batch, replace_prompts

    image = picture(app_world)
    seg = session.run(image, session.prompts(BANKED), passes=2, min_area=16)
    model = session.model
    from dpseg.model.prompts import VisualPrompts

    bank = Bank(app_world / "bank").prototypes(BANKED, "tiny", 2, encode_size=64)
    protos = VisualPrompts(bank.embedding, dict(bank.pooled))
    text = model.encode_text(BANKED)
    x = torch.from_numpy(np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR)).copy())
    x = x.permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        features = model.encode_image(model.image_encoder.normalize(x))
        logits = model(text=text, visual=protos, features=features)
        refs = refine_batch(model, x, predict_labels(logits, (64, 64)), RefineSettings(64, 16))
        logits2 = model(text=text, visual=replace_prompts(protos, refs), features=features)
    assert np.array_equal(seg.preds[1], predict_labels(logits, image.shape[:2])[0].numpy())
    assert np.array_equal(seg.preds[2], predict_labels(logits2, image.shape[:2])[0].numpy())
    assert seg.preds[1].shape == image.shape[:2]
    assert sum(d["pixels"] for d in seg.detected) == image.shape[0] * image.shape[1]


def test_prompt_kinds_and_classes_missing_from_the_bank(session):
    names = [*BANKED, "sky"]
    dual = session.prompts(names, "dual")
    assert dual.text_only == ["sky"] and session.kinds() == ["dual", "text", "visual"]
    # the class the bank lacks: its visual slot is its text, no visual guidance
    assert torch.equal(dual.visual.embedding[2], dual.text[2])
    assert all(float(p[2].abs().sum()) == 0 for p in dual.visual.pooled.values())
    assert all(float(p[0].abs().sum()) > 0 for p in dual.visual.pooled.values())
    text = session.prompts(names, "text")
    assert torch.equal(text.visual.embedding, text.text) and text.text_only == names
    assert all(float(p.abs().sum()) == 0 for p in text.visual.pooled.values())
    visual = session.prompts(names, "visual")
    assert torch.equal(visual.text[:2], dual.visual.embedding[:2]) and torch.equal(visual.text[2], dual.text[2])
    from dpseg.errors import UserError

    with pytest.raises(UserError, match="choose one of: dual, text, visual"):
        session.prompts(names, "both")


def test_run_shows_both_passes_a_legend_and_the_crops_that_replaced_the_prompts(app_world, runner):
    view = runner.run(app_world / "picture.png", "red solid circle, blue solid square, sky")
    assert view.ok, view.status
    assert "3 classes, dual prompts, pass I and pass II" in view.status and "text prompts only: sky" in view.status
    image = picture(app_world)
    for p in (1, 2):
        overlay = view.overlays[p]
        assert overlay.shape == image.shape and overlay.dtype == np.uint8
        assert not np.array_equal(overlay, image)  # coloured: every pixel has a class
    seg = view.state
    for name in {seg.prompts.names[i] for p in (1, 2) for i in np.unique(seg.preds[p])}:
        assert f"<td>{name}</td>" in view.legend_html
    assert "text only" in view.legend_html
    refined = [seg.prompts.names[c] for c in seg.refinement.classes.tolist()]
    assert [caption.split(":")[0] for _, caption in view.gallery] == refined
    for (strip, caption), name in zip(view.gallery, refined, strict=True):
        prompts = 0 if name == "sky" else 2  # the bank holds 2 templates per class
        assert strip.shape == (TILE, (max(prompts, 1) + 1) * TILE + TILE // 2, 3), caption
        assert ("2 bank prompt images" in caption) == (prompts == 2)


def test_cost_maps_are_the_heatmap_definition_at_the_image_size(app_world, runner, session):
    from pipeline.analyze.heatmap import template_mean_cost, upsample

    view = runner.run(app_world / "picture.png", ", ".join(BANKED))
    seg = view.state
    maps = session.cost_maps(seg, 0)
    assert set(maps) >= {"text", "visual", "dual"}
    for m in maps.values():
        assert m.shape == (150, 200) and m.min() >= -1 - 1e-5 and m.max() <= 1 + 1e-5
    want = upsample(template_mean_cost(seg.features.dense, seg.prompts.text[:1]), (150, 200))[0]
    assert np.allclose(maps["text"], want.numpy(), atol=1e-6)
    figure, status = runner.cost_figure(seg, BANKED[0])
    assert figure.ndim == 3 and figure.shape[2] == 3 and status.startswith("cost maps of red solid circle")
    assert runner.cost_figure(None, BANKED[0])[1] == "Error: press Run first"


def test_bad_input_is_one_line_in_the_page(app_world, runner, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"not an image at all")
    cases = {
        "is not an image": runner.run(not_image, "cat"),
        "no image": runner.run(None, "cat"),
        "no classes": runner.run(app_world / "picture.png", " , "),
        "2,000 classes is more than this app takes (50)": runner.run(
            app_world / "picture.png", ", ".join(f"class {i}" for i in range(2000))
        ),
        "named twice: cat": runner.run(app_world / "picture.png", "cat, dog, cat"),
        "give a .txt": runner.run(app_world / "picture.png", None, app_world / "picture.png"),
    }
    for fragment, view in cases.items():
        assert view.status.startswith("Error: ") and fragment in view.status, view.status
        assert "\n" not in view.status and "Traceback" not in view.status and not view.overlays


def test_a_huge_image_is_resized_with_a_note(session, tmp_path):
    Image.new("RGB", (600, 90), (200, 30, 30)).save(tmp_path / "wide.png")
    view = AppRunner(session, max_side=128).run(tmp_path / "wide.png", "red solid circle")
    assert view.ok and "resized to 128×19" in view.status
    assert view.overlays[2].shape == (19, 128, 3)


def test_typed_text_is_never_read_as_a_server_file_but_uploads_are(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password\n")
    assert parse_page_classes(str(secret), None) == [str(secret)]
    names = tmp_path / "mine.txt"
    names.write_text("cat, kitty\ndog\n")
    assert parse_page_classes("ignored", names) == ["cat, kitty", "dog"]
    assert len(parse_page_classes("shapes", None)) == 48  # a registered vocabulary by name


def test_segment_a_folder_loads_the_model_once(app_world, cli, tmp_path, monkeypatch):
    import dpseg.model.checkpoint as checkpoint

    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    image = Image.open(app_world / "picture.png")
    for name in ("one.png", "two.jpg", "b/one.png"):
        image.save(folder / name)
    loads = []
    real = checkpoint.load_dpseg
    monkeypatch.setattr(checkpoint, "load_dpseg", lambda *a, **k: loads.append(1) or real(*a, **k))
    out = tmp_path / "seg"
    glob = str(folder / "b" / "*.png")
    result = cli(
        "segment",
        folder,
        glob,
        "--classes",
        "red solid circle",
        "--checkpoint",
        app_world / "ckpt",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(loads) == 1
    assert [item["image"] for item in report["images"]] == [
        str(folder / "one.png"),
        str(folder / "two.jpg"),
        glob.replace("*", "one"),
    ]
    assert [item["output"] for item in report["images"]] == [
        str(out / "one.png"),
        str(out / "two.png"),
        str(out / "one-2.png"),
    ]
    assert all((out / n).is_file() for n in ("one.png", "two.png", "one-2.png"))


def test_segment_refuses_an_empty_folder_and_a_pattern_with_no_match(app_world, cli, one_line_error, tmp_path):
    (tmp_path / "empty").mkdir()
    ckpt = app_world / "ckpt"
    one_line_error(cli("segment", tmp_path / "empty", "--classes", "cat", "--checkpoint", ckpt), "holds no images")
    one_line_error(
        cli("segment", str(tmp_path / "*.jpg"), "--classes", "cat", "--checkpoint", ckpt), "matches no image"
    )


def test_app_command_without_a_checkpoint_is_one_line(cli, one_line_error, tmp_path):
    one_line_error(cli("app", "--checkpoint", tmp_path / "none"), "no checkpoint at", "--checkpoint")


def test_bench_app_reports_the_run_to_both_overlays(app_world, cli, tmp_path):
    result = cli(
        "bench",
        "app",
        "--checkpoint",
        app_world / "ckpt",
        "--size",
        "64",
        "--repeats",
        "1",
        "--classes",
        "shapes",
        "-o",
        tmp_path / "b.json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["image"]["size"] == [64, 64] and data["classes"] == 48 and data["model_input"] == 64
    assert len(data["runs_s"]) == 1 and data["run_to_both_overlays_s"] == data["runs_s"][0] > 0
