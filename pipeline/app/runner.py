"""What the app's page does when a user presses Run, as plain functions (no Gradio here, so
tests and `dpseg bench app` call them directly).

    runner = AppRunner(SegmentSession("out/train/checkpoint"))
    view = runner.run("photo.jpg", "cat, dog, sofa", None, kind="dual", refine=True)
    view.status, view.overlays[1], view.overlays[2], view.legend_html, view.gallery
    runner.cost_figure(view.state, "cat")

Every bad input ends as `view.status == "Error: ..."` (one line) and no pictures; nothing raises.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpseg.errors import UserError
from pipeline.evaluate.panels import blend, palette

MAX_CLASSES = 1000  # ADE-847 fits; more than this is a typo or a pasted file, and slow on a CPU
MAX_SIDE = 2048  # a larger upload is resized (long side) before anything else, with a note
PROMPT_IMAGES = 4  # bank prompt images shown per class beside its crop
TILE = 96

log = logging.getLogger(__name__)


@dataclass
class View:
    """Everything the page shows after Run."""

    status: str  # one line: what ran, or `Error: ...`
    image: np.ndarray | None = None
    overlays: dict[int, np.ndarray] = field(default_factory=dict)  # pass -> blended RGB at the image's size
    legend_html: str = ""
    gallery: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (bank prompts | crop strip, caption)
    classes: list[str] = field(default_factory=list)
    state: Any = None  # the Segmentation, for the cost maps
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.status.startswith("Error:")


def error_line(err: BaseException) -> str:
    return "Error: " + " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def load_upload(path: str | Path | None, max_side: int = MAX_SIDE) -> tuple[np.ndarray, list[str]]:
    """The uploaded file as RGB uint8, its long side brought down to `max_side` (with a note)."""
    from PIL import Image, UnidentifiedImageError

    if path is None or str(path) == "":
        raise UserError("no image: upload a JPEG or PNG, or pick one of the examples")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except Image.DecompressionBombError:
        raise UserError(f"the image has more pixels than {Image.MAX_IMAGE_PIXELS:,}; upload a smaller one") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UserError(f"{Path(path).name} is not an image this app can read; upload a JPEG or PNG") from None
    notes = []
    w, h = image.size
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = image.resize(size, Image.BILINEAR)
        notes.append(f"the image ({w}×{h}) was resized to {size[0]}×{size[1]} (this app's limit: {max_side} px)")
    return np.asarray(image), notes


def parse_page_classes(text: str | None, file: str | Path | None, max_classes: int = MAX_CLASSES) -> list[str]:
    """Typed classes (comma-separated names, or a registered vocabulary name) or an uploaded
    .txt/.json vocabulary (one class a line, synonyms joined by commas). A typed path is taken as
    names, never read: the page must not open files on the server."""
    from dpseg.data.vocab import VOCABULARIES, load_vocab
    from pipeline.evaluate.segment import parse_classes

    if file:
        if Path(file).suffix.lower() not in (".txt", ".json"):
            raise UserError(f"class file {Path(file).name}: give a .txt (one class a line) or .json list")
        names = parse_classes(str(file))
    else:
        text = (text or "").strip()
        if not text:
            raise UserError('no classes: type names separated by commas ("cat, dog, sofa") or a vocabulary name')
        if text in VOCABULARIES:
            names = load_vocab(text)
        else:
            names = [n.strip() for n in text.split(",") if n.strip()]
            if not names:
                raise UserError('no classes: type names separated by commas ("cat, dog, sofa")')
            doubles = sorted({n for n in names if names.count(n) > 1})
            if doubles:
                raise UserError(f"classes named twice: {', '.join(doubles)}")
    if len(names) > max_classes:
        raise UserError(f"{len(names):,} classes is more than this app takes ({max_classes:,}); give fewer")
    return names


class AppRunner:
    def __init__(self, session, max_classes: int = MAX_CLASSES, max_side: int = MAX_SIDE, generate: bool = False):
        self.session = session
        self.max_classes = max_classes
        self.max_side = max_side
        self.generate = generate
        self._manifest = None
        self._prompt_images: dict[str, list[np.ndarray]] = {}

    # ---- Run ----------------------------------------------------------------------------------
    def run(
        self,
        image_path: str | Path | None,
        classes_text: str | None,
        classes_file: str | Path | None = None,
        kind: str | None = None,
        refine: bool = True,
        gallery: bool = True,
    ) -> View:
        try:
            return self._run(image_path, classes_text, classes_file, kind, refine, gallery)
        except UserError as err:
            return View(error_line(err))
        except Exception as err:  # the page shows one line; the server's log keeps the traceback
            log.exception("app run failed")
            return View(f"Error: internal error ({type(err).__name__}: {err}); the server's log has the details")

    def _run(self, image_path, classes_text, classes_file, kind, refine, gallery) -> View:
        image, notes = load_upload(image_path, self.max_side)
        names = parse_page_classes(classes_text, classes_file, self.max_classes)
        session = self.session
        prompts = session.prompts(names, kind or session.default_kind(), generate=self.generate)
        passes = 2 if refine and prompts.visual is not None else 1
        if refine and passes == 1:
            notes.append("this checkpoint uses no visual prompts: pass II has nothing to replace, pass I only")
        seg = session.run(image, prompts, passes=passes)
        colours = palette(len(names))
        overlays = {p: blend(image, seg.preds[p], colours) for p in sorted(seg.preds)}
        if prompts.text_only and prompts.kind != "text":
            shown = ", ".join(prompts.text_only[:8]) + (
                f" and {len(prompts.text_only) - 8} more" if len(prompts.text_only) > 8 else ""
            )
            notes.append(f"not in the bank, text prompts only: {shown}")
        view = View(
            status=self._status(seg, notes),
            image=image,
            overlays=overlays,
            legend_html=legend_html(seg, colours, set(prompts.text_only)),
            classes=list(names),
            state=seg,
            notes=notes,
        )
        if gallery and seg.refinement is not None:
            view.gallery = self.prompt_gallery(seg)
        return view

    def _status(self, seg, notes: list[str]) -> str:
        p = seg.prompts
        shown = " and ".join(f"pass {'I' * k}" for k in sorted(seg.preds))
        count = f"{len(p.names)} class" + ("es" if len(p.names) != 1 else "")
        line = f"{count}, {p.kind} prompts, {shown} at {self.session.size} px"
        return "; ".join([line, *notes])

    # ---- what pass II did ---------------------------------------------------------------------
    def prompt_gallery(self, seg) -> list[tuple[np.ndarray, str]]:
        """Per class pass II refined: the bank's prompt images, then the crop(s) that replaced them."""
        from bank.show import category_images

        crops = self.session.crops(seg)
        if not crops:
            return []
        names = seg.prompts.names
        refined = [names[c] for c in crops]
        bank_images: dict[str, list] = {}
        if self.session.bank is not None and seg.prompts.kind != "text":
            if self._manifest is None:
                from bank.merge import read_manifest

                self._manifest, _ = read_manifest(self.session.bank.store)
            new = [n for n in refined if n not in self._prompt_images]
            if new:  # read once per class and process
                found = category_images(self.session.bank.root, new, PROMPT_IMAGES, table=self._manifest)
                self._prompt_images.update(found)
            bank_images = {n: self._prompt_images[n] for n in refined}
        out = []
        areas = dict(zip(seg.refinement.classes.tolist(), seg.refinement.areas.tolist(), strict=True))
        for c, pieces in crops.items():
            name = names[c]
            prompts = bank_images.get(name) or []
            source = f"{len(prompts)} bank prompt images" if prompts else "text prompt only"
            caption = f"{name}: {source} -> {len(pieces)} crop(s) of this image ({areas[c]} px in pass I)"
            out.append((strip(prompts, pieces), caption))
        return out

    # ---- cost maps ----------------------------------------------------------------------------
    def cost_figure(self, seg, name: str | None) -> tuple[np.ndarray | None, str]:
        """`dpseg analyze heatmap`'s figure for one class of the last run: image | text | visual |
        dual (| crop) cost maps, as an RGB array and a one-line status."""
        from pipeline.analyze import plots

        if seg is None:
            return None, "Error: press Run first"
        if not name or name not in seg.prompts.names:
            return None, "Error: choose one of the run's classes"
        maps = self.session.cost_maps(seg, seg.prompts.names.index(name))
        columns = list(maps)
        stack = np.stack([maps[k] for k in columns])[None]  # (1, C, H, W)
        fig = plots.heatmap_grid(seg.image, [name], columns, stack, f"cost maps of {name!r} (mean cos over templates)")
        return figure_rgb(fig), f"cost maps of {name}: " + ", ".join(
            f"{k} [{float(v.min()):.2f}, {float(v.max()):.2f}]" for k, v in maps.items()
        )


# ---- pictures -------------------------------------------------------------------------------
def strip(prompts: list[np.ndarray], crops: list[np.ndarray], tile: int = TILE) -> np.ndarray:
    """One row: the bank's prompt images, a gap with an arrow, the crops."""
    from PIL import Image, ImageDraw

    gap = tile // 2
    count = max(len(prompts), 1) + len(crops)
    sheet = Image.new("RGB", (count * tile + gap, tile), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    if prompts:
        for p in prompts:
            sheet.paste(Image.fromarray(p).resize((tile, tile)), (x, 0))
            x += tile
    else:
        draw.rectangle([2, 2, tile - 3, tile - 3], outline=(160, 160, 160))
        draw.text((8, tile // 2 - 6), "text only", fill=(90, 90, 90))
        x += tile
    mid = tile // 2
    draw.line([(x + 6, mid), (x + gap - 8, mid)], fill=(40, 40, 40), width=3)
    draw.polygon([(x + gap - 4, mid), (x + gap - 12, mid - 6), (x + gap - 12, mid + 6)], fill=(40, 40, 40))
    x += gap
    for c in crops:
        sheet.paste(Image.fromarray(c).resize((tile, tile)), (x, 0))
        x += tile
    return np.asarray(sheet)


def sheet(rows: list[tuple[np.ndarray, str]], caption_height: int = 18) -> np.ndarray | None:
    """The gallery's strips stacked into one picture, each under its caption."""
    from PIL import Image, ImageDraw

    if not rows:
        return None
    width = max(strip.shape[1] for strip, _ in rows)
    height = sum(strip.shape[0] + caption_height for strip, _ in rows)
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    y = 0
    for strip, caption in rows:
        draw.text((2, y + 3), caption, fill=(20, 20, 20))
        out.paste(Image.fromarray(strip), (0, y + caption_height))
        y += strip.shape[0] + caption_height
    return np.asarray(out)


def figure_rgb(fig) -> np.ndarray:
    import io

    from PIL import Image

    from pipeline.analyze.plots import pyplot

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def legend_html(seg, colours: np.ndarray, text_only: set[str]) -> str:
    """The classes found (in any pass shown), their share of the image per pass, and where
    their prompts came from."""
    names = seg.prompts.names
    passes = sorted(seg.preds)
    shares = {p: np.bincount(seg.preds[p].ravel(), minlength=len(names)) / seg.preds[p].size for p in passes}
    found = [i for i in np.argsort(-shares[passes[-1]], kind="stable") if any(shares[p][i] > 0 for p in passes)]
    head = "".join(f"<th>pass {'I' * p}</th>" for p in passes)
    rows = []
    for i in found:
        r, g, b = (int(v) for v in colours[i])
        source = "text only" if names[i] in text_only or seg.prompts.kind == "text" else seg.prompts.kind
        cells = "".join(f"<td>{100 * shares[p][i]:.1f}%</td>" for p in passes)
        rows.append(
            f'<tr><td><span style="display:inline-block;width:14px;height:14px;background:rgb({r},{g},{b})">'
            f"</span></td><td>{html.escape(names[i])}</td>{cells}<td>{source}</td></tr>"
        )
    table = f'<table class="dpseg-legend"><tr><th></th><th>class</th>{head}<th>prompts</th></tr>{"".join(rows)}</table>'
    return f'<div style="max-height:360px;overflow-y:auto">{table}</div>'
