"""`dpseg app`: the Gradio page around AppRunner, served on this machine only by default.

Offline and closed by construction: analytics off, no share link, no server-side rendering (no
Node), bound to 127.0.0.1 unless a host is given, uploads capped in size."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpseg.errors import UserError
from pipeline.app.runner import sheet

EXAMPLES = 4
PASS_LABELS = {1: "pass I (bank prompts)", 2: "pass II (prompts refined with this image's crops)"}


@dataclass
class Example:
    image: str
    classes: str


def import_gradio():
    # before the import: Gradio reads these when it loads
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gradio as gr
    except ImportError:
        raise UserError(
            "`dpseg app` needs Gradio 6, an optional extra: pip install -c constraints.txt -e '.[app]'"
        ) from None
    major = int(gr.__version__.split(".")[0])
    if major < 6:
        raise UserError(
            f"Gradio {gr.__version__} is installed; `dpseg app` needs 6.x (older ones fetch fonts online): "
            "pip install -c constraints.txt -e '.[app]'"
        )
    return gr


def dataset_examples(session, folder: Path, k: int = EXAMPLES, dataset: str | None = None) -> list[Example]:
    """The first k val images of the dataset the checkpoint was trained on (or `dataset`), written
    as PNGs into `folder`, each with the dataset's vocabulary as its classes. None when the
    dataset is not on this machine."""
    from PIL import Image

    from dpseg.data.readers import SegmentationDataset

    root = dataset or session.extra.get("dataset")
    if not root or not Path(root).is_dir():
        return []
    try:
        data = SegmentationDataset(root, "val")
    except UserError:
        return []
    vocab = data.info.vocabulary
    classes = vocab if isinstance(vocab, str) and "/" not in vocab else ", ".join(data.class_names)
    out = []
    for i in range(min(k, len(data))):
        image, _ = data.load(i)
        path = folder / f"example-{i}.png"
        Image.fromarray(image).save(path)
        out.append(Example(str(path), classes))
    return out


def build_page(runner, examples: list[Example] = ()):
    """The Blocks app (not launched)."""
    gr = import_gradio()
    session = runner.session
    kinds = session.kinds()
    with gr.Blocks(title="dpseg") as page:
        gr.Markdown(
            "## dpseg: your image, your classes\n"
            "Pass I segments with the bank's prompts; pass II gives each detected class's visual prompts "
            "the image's own crop (all of them, or the share the checkpoint was trained with) and segments again."
        )
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", sources=["upload"], label="image", elem_id="upload")
                classes = gr.Textbox(
                    label="classes",
                    placeholder='cat, dog, sofa - or a vocabulary name such as "ade-150"',
                    elem_id="classes",
                )
                class_file = gr.File(
                    label="or a class file (.txt: one class a line, synonyms joined by commas)",
                    file_types=[".txt", ".json"],
                    type="filepath",
                    elem_id="class-file",
                )
                kind = gr.Radio(kinds, value=session.default_kind(), label="prompts", elem_id="kind")
                refine = gr.Checkbox(value=kinds != ["text"], label="pass II (refine with the image's crops)")
                run = gr.Button("Run", variant="primary", elem_id="run")
                if examples:
                    gr.Examples([[e.image, e.classes] for e in examples], inputs=[image, classes], label="examples")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    pass1 = gr.Image(label=PASS_LABELS[1], format="png", interactive=False, elem_id="pass1")
                    pass2 = gr.Image(label=PASS_LABELS[2], format="png", interactive=False, elem_id="pass2")
                legend = gr.HTML(elem_id="legend")
                gallery = gr.Image(
                    label="pass II: the bank's prompt images → the crop of this image given to them",
                    format="png",
                    interactive=False,
                    elem_id="prompts",
                )
                with gr.Row():
                    heat_class = gr.Dropdown([], label="cost map of class", elem_id="heat-class")
                    heat_button = gr.Button("Cost maps", elem_id="heat")
                heat_status = gr.Markdown("", elem_id="heat-status")
                heat = gr.Image(label="cost maps", format="png", interactive=False, elem_id="heatmap")

        def on_run(image_path, text, file, kind_value, refine_value):
            view = runner.run(image_path, text, file, kind_value, refine_value)
            if not view.ok:
                return view.status, None, None, "", None, gr.update(choices=[], value=None), None
            first = view.state.final
            found = [view.classes[i] for i in np.argsort(-np.bincount(first.ravel()), kind="stable")]
            found = [n for n in found if n in view.classes]
            return (
                view.status,
                view.overlays.get(1),
                view.overlays.get(2),
                view.legend_html,
                sheet(view.gallery),
                gr.update(choices=view.classes, value=found[0] if found else None),
                view.state,
            )

        def on_heat(seg, name):
            return runner.cost_figure(seg, name)[::-1]

        run.click(
            on_run,
            [image, classes, class_file, kind, refine],
            [status, pass1, pass2, legend, gallery, heat_class, state],
            concurrency_limit=1,
        )
        heat_button.click(on_heat, [state, heat_class], [heat_status, heat], concurrency_limit=1)
    return page


def serve(
    runner,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload: str = "20mb",
    examples: list[Example] = (),
    block: bool = True,
):
    """Launches the page; with block=False returns (page, url) and serves on a thread."""
    page = build_page(runner, examples)
    allowed = sorted({str(Path(e.image).parent) for e in examples})
    page.queue(default_concurrency_limit=1)
    _, url, _ = page.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        max_file_size=max_upload,
        allowed_paths=allowed,
        footer_links=[],
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return page, url


def examples_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="dpseg-app-examples-"))
