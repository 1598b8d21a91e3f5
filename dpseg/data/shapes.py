"""The `shapes` world: named categories ("red striped triangle") drawn procedurally.

One renderer serves two users:
- `render_prompt_image(category, template, size, seed)`: a visual prompt for one
  (category, template) pair, the offline `procedural` bank generator; the template's words
  change the picture ("many" -> several instances, "small", "blurry", "sketch", ...), as a
  text-to-image model would.
- `render_scene(size, seed_key, allowed)`: a benchmark image and its label map
  (`dpseg data synth`), drawn with the same shape/texture/colour primitives and hard
  (un-antialiased) masks so that every labelled pixel is exactly the painted object.

Randomness comes from a seed mixed with stable hashes of the keys (never Python's salted
`hash`), so a result depends only on its arguments, not on call order or process.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 78, 215),
    "yellow": (232, 200, 30),
}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

SHAPES_CATEGORIES: list[str] = [f"{c} {t} {s}" for c, t, s in product(COLOURS, TEXTURES, SHAPES)]
# The canvas as a class of its own (as ADE and COCO-Stuff label walls and sky): the world with it
# is the 48 shapes plus this name, last, so the shapes keep their ids.
BACKGROUND = "background"
WORLD_CATEGORIES: list[str] = [*SHAPES_CATEGORIES, BACKGROUND]
SCENE_STYLES = ("plain", "photo")  # photo: per-image light, colour cast, texture scale, blur, clutter
PROMPT_LOOKS = ("scene", "studio")  # studio: clean, centred objects on a flat backdrop (a generated look)


def _is_unseen(colour: int, texture: int, shape: int) -> bool:
    # One colour per (texture, shape) pair is held out, rotating with the pair: every single
    # attribute (and most attribute pairs) still occurs in training, only the composition is new.
    return (colour + texture + shape) % len(COLOURS) == 0


UNSEEN: list[str] = [
    f"{c} {t} {s}"
    for (ci, c), (ti, t), (si, s) in product(enumerate(COLOURS), enumerate(TEXTURES), enumerate(SHAPES))
    if _is_unseen(ci, ti, si)
]
SEEN: list[str] = [name for name in SHAPES_CATEGORIES if name not in UNSEEN]
SEEN_IDS: list[int] = [SHAPES_CATEGORIES.index(n) for n in SEEN]
UNSEEN_IDS: list[int] = [SHAPES_CATEGORIES.index(n) for n in UNSEEN]

SHADE = 0.5  # the second tone of a texture: the same hue, darker, so hue identifies the class


# --- seeds --------------------------------------------------------------------------------


def _rng(seed: int, *keys: object) -> np.random.Generator:
    words = [int(seed) % 2**32, (int(seed) >> 32) % 2**32] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(words)


# --- categories ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Look:
    colour: tuple[int, int, int]
    texture: str
    shape: str


def parse_category(category: str) -> Look:
    """Words of the name pick colour/texture/shape; missing ones come from a stable hash of
    the name, so any vocabulary (e.g. "wall") still gets a deterministic, distinct look."""
    words = category.lower().replace(",", " ").split()
    digest = zlib.crc32(category.encode())
    colour = next((w for w in words if w in COLOURS), list(COLOURS)[digest % len(COLOURS)])
    texture = next((w for w in words if w in TEXTURES), TEXTURES[(digest >> 8) % len(TEXTURES)])
    shape = next((w for w in words if w in SHAPES), SHAPES[(digest >> 16) % len(SHAPES)])
    return Look(COLOURS[colour], texture, shape)


# --- primitives ---------------------------------------------------------------------------


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Hard (bool) mask of one shape; radius is the circumscribed radius in pixels."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, angle), fill=255)
    return np.asarray(canvas) > 0


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    if shape == "star":  # five points, inner radius 0.45 of the outer one
        radii = [radius if k % 2 == 0 else 0.45 * radius for k in range(10)]
        angles = [angle + k * math.pi / 5 for k in range(10)]
    else:
        sides = {"triangle": 3, "square": 4}[shape]
        radii = [radius] * sides
        angles = [angle + k * 2 * math.pi / sides for k in range(sides)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]


def texture_pattern(texture: str, size: int, period: float, angle: float, phase: float) -> np.ndarray:
    """Bool map, True where the darker tone goes."""
    if texture == "solid":
        return np.zeros((size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = xx * math.cos(angle) + yy * math.sin(angle) + phase
    if texture == "striped":
        return (u / period) % 1.0 < 0.5
    v = -xx * math.sin(angle) + yy * math.cos(angle) + phase
    du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
    return du * du + dv * dv < 0.3**2  # dotted


def paint_object(
    image: np.ndarray, mask: np.ndarray, look: Look, rng: np.random.Generator, size: int, period_scale: float = 1.0
) -> None:
    """Fill `mask` of a float image with the look's two-tone texture (in place)."""
    base = np.asarray(look.colour, dtype=np.float32) * rng.uniform(0.92, 1.08)
    period = (size * rng.uniform(0.07, 0.12) + 3.0) * period_scale
    dark = texture_pattern(look.texture, size, period, rng.uniform(0, math.pi), rng.uniform(0, period))
    image[mask & ~dark] = np.clip(base, 0, 255)
    image[mask & dark] = np.clip(base * SHADE, 0, 255)


def photo_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Low-saturation grey gradient with noise, so object colours stand out and the hue of a
    pixel says whether it belongs to an object."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    a = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(a) + yy * math.sin(a)) * rng.uniform(-40, 40)
    grey = rng.uniform(90, 180) + ramp + rng.normal(0, 5, (size, size)).astype(np.float32)
    tint = rng.uniform(-6, 6, 3).astype(np.float32)
    return np.clip(grey[..., None] + tint, 0, 255)


def _flat_background(size: int, colour: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0, 3, (size, size, 1)).astype(np.float32)
    return np.clip(np.asarray(colour, dtype=np.float32) + noise, 0, 255)


def _brick_background(size: int, rng: np.random.Generator) -> np.ndarray:
    image = _flat_background(size, (150, 95, 80), rng)
    yy, xx = np.mgrid[0:size, 0:size]
    row = max(size // 8, 2)
    offset = (yy // row % 2) * row
    mortar = (yy % row == 0) | ((xx + offset) % (2 * row) == 0)
    image[mortar] = (200, 195, 185)
    return image


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    inner = mask.copy()
    for _ in range(width):
        inner = inner & np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1) & np.roll(inner, -1, 1)
    return mask & ~inner


# --- template words -> style --------------------------------------------------------------


@dataclass
class Style:
    count: tuple[int, int] = (1, 1)
    scale: tuple[float, float] = (0.28, 0.4)  # circumscribed radius / image size
    cropped: bool = False
    background: str = "photo"  # photo | paper | skin | brick | fabric
    line_art: bool = False  # only the outline, as a drawing
    outline: bool = False  # dark contour around a filled object (cartoon, tattoo)
    shading: bool = False  # a lit, three-dimensional look (sculpture, toy, rendering)
    faint: bool = False  # hard to see: low contrast against the background
    stitched: bool = False
    dirty: bool = False
    brightness: float = 1.0
    greyscale: bool = False
    blur: float = 0.0  # Gaussian radius as a fraction of the image size
    downsample: int = 1
    pixelated: bool = False
    jpeg_quality: int | None = None


def style_from_template(template: str) -> Style:
    t = template.lower()
    s = Style()

    def has(*words: str) -> bool:
        return any(w in t for w in words)

    if has("many"):
        s.count, s.scale = (3, 6), (0.1, 0.17)
    if has("small"):
        s.scale = (0.1, 0.15)
    if has("large", " big "):
        s.scale = (0.42, 0.5)
    if has("close-up"):
        s.scale = (0.6, 0.8)
    if has("cropped"):
        s.scale, s.cropped = (0.45, 0.6), True
    if has("drawing", "sketch", "doodle"):
        s.background, s.line_art = "paper", True
    if has("sketch"):
        s.greyscale = True
    if has("cartoon", "video game", "tattoo"):
        s.outline = True
    if has("cartoon"):
        s.background = "paper"
    if has("video game"):
        s.downsample, s.pixelated = 6, True
    if has("tattoo"):
        s.background = "skin"
    if has("graffiti"):
        s.background = "brick"
    if has("embroidered"):
        s.background, s.stitched = "fabric", True
    if has("sculpture", "plastic", "toy", "plushie", "origami", "rendering"):
        s.shading = True
    if has("plushie"):
        s.blur = max(s.blur, 0.01)
    if has("painting", "art of", "rendition"):
        s.blur = max(s.blur, 0.008)
    if has("hard to see"):
        s.faint = True
    if has("dirty"):
        s.dirty = True
    if has("clean"):
        s.background = "paper" if s.background == "photo" else s.background
    if has("bright"):
        s.brightness = 1.3
    if has("dark"):
        s.brightness = 0.45
    if has("black and white"):
        s.greyscale = True
    if has("blurry"):
        s.blur = 0.03
    if has("low resolution"):
        s.downsample = 4
    if has("pixelated"):
        s.downsample, s.pixelated = 8, True
    if has("jpeg corrupted"):
        s.jpeg_quality = 5
    return s


_BACKGROUNDS = {
    "paper": (245, 243, 236),
    "skin": (224, 178, 148),
    "fabric": (205, 200, 188),
    "studio": (228, 228, 232),
}


def _background(style: Style, size: int, rng: np.random.Generator) -> np.ndarray:
    if style.background == "photo":
        return photo_background(size, rng)
    if style.background == "brick":
        return _brick_background(size, rng)
    return _flat_background(size, _BACKGROUNDS[style.background], rng)


def _centre(size: int, radius: float, cropped: bool, rng: np.random.Generator) -> tuple[float, float]:
    if cropped:  # push the centre near an edge so part of the object leaves the frame
        edge = rng.integers(4)
        along = rng.uniform(0.3, 0.7) * size
        across = rng.uniform(0.05, 0.2) * size
        return [(along, across), (along, size - across), (across, along), (size - across, along)][edge]
    margin = min(radius, size / 2)
    return rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)


def _free_centre(size: int, radius: float, cropped: bool, placed: list, rng: np.random.Generator) -> tuple[float, float]:
    # "many" should read as several separate instances: retry a few centres to avoid overlap
    for _ in range(20):
        cx, cy = _centre(size, radius, cropped, rng)
        if all(math.hypot(cx - x, cy - y) > radius + r for x, y, r in placed):
            break
    return cx, cy


def _finish(image: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    if style.dirty:
        spots = rng.random((size, size)) < 0.03
        image[spots] *= rng.uniform(0.2, 0.5)
    image = np.clip(image * style.brightness, 0, 255)
    if style.greyscale:
        image[:] = (image @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    pil = Image.fromarray(image.astype(np.uint8))
    if style.blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=max(style.blur * size, 0.5)))
    if style.downsample > 1:
        small = max(size // style.downsample, 2)
        pil = pil.resize((small, small), Image.BILINEAR)
        pil = pil.resize((size, size), Image.NEAREST if style.pixelated else Image.BILINEAR)
    if style.jpeg_quality is not None:
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=style.jpeg_quality)
        pil = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return np.asarray(pil, dtype=np.uint8)


def render_prompt_image(category: str, template: str, size: int, seed: int, look: str = "scene") -> np.ndarray:
    """One visual prompt: `category` drawn as `template` describes; (size, size, 3) uint8.

    look="scene": on the scenes' photo backdrop where the template asks for a photo, anywhere in
    the frame; look="studio": a generated look unlike the scenes (a flat studio backdrop, the
    object centred, never cropped). `BACKGROUND` is the canvas alone, with no object."""
    if size < 8:
        raise ValueError(f"prompt images need size >= 8, got {size}")
    if look not in PROMPT_LOOKS:
        raise ValueError(f"look must be one of {PROMPT_LOOKS}, got {look!r}")
    style = style_from_template(template)
    rng = _rng(seed, category, template)
    if category == BACKGROUND:
        return _finish(_background(style, size, rng), style, rng)
    shape_look = parse_category(category)
    studio = look == "studio"
    if studio:
        style.cropped = False
        if style.background == "photo":
            style.background = "studio"
    image = _background(style, size, rng)
    backdrop = image.copy()
    placed: list[tuple[float, float, float]] = []
    count = int(rng.integers(style.count[0], style.count[1] + 1))
    for index in range(count):
        radius = size * rng.uniform(*style.scale)
        if studio and index == 0:  # the first (often the only) object sits in the middle
            cx, cy = size / 2 + rng.uniform(-0.03, 0.03) * size, size / 2 + rng.uniform(-0.03, 0.03) * size
        else:
            cx, cy = _free_centre(size, radius, style.cropped, placed, rng)
        placed.append((cx, cy, radius))
        mask = shape_mask(shape_look.shape, size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        if style.line_art:
            image[_outline(mask, max(size // 40, 1))] = shape_look.colour
            continue
        paint_object(image, mask, shape_look, rng, size)
        if style.shading:
            _shade(image, mask, cx, cy, radius)
        if style.stitched:
            yy, xx = np.nonzero(mask)
            stitch = (xx + yy) % 3 == 0
            image[yy[stitch], xx[stitch]] *= 0.75
        if style.faint:
            image[mask] = 0.3 * image[mask] + 0.7 * backdrop[mask]
        if style.outline:
            image[_outline(mask, max(size // 32, 1))] = (25, 25, 25)
    return _finish(image, style, rng)


def _shade(image: np.ndarray, mask: np.ndarray, cx: float, cy: float, radius: float) -> None:
    # light from the upper left: brighter there, darker toward the lower right
    yy, xx = np.nonzero(mask)
    light = 1.1 - 0.35 * ((xx - cx + yy - cy) / (2 * radius) + 0.5)
    image[yy, xx] *= np.clip(light, 0.6, 1.2)[:, None]
    np.clip(image, 0, 255, out=image)


# --- benchmark scenes ---------------------------------------------------------------------


def render_scene(
    size: int,
    seed: int,
    key: str,
    allowed: list[int],
    max_objects: int = 4,
    ignore: int = 255,
    background: int | None = None,
    style: str = "plain",
) -> tuple[np.ndarray, np.ndarray]:
    """A benchmark image (size, size, 3) uint8 and its label map (size, size) uint8:
    1..max_objects objects of categories drawn from `allowed` (indices into
    SHAPES_CATEGORIES); later objects occlude earlier ones; the canvas is labelled `background`
    (the class id of `BACKGROUND`) when given, else `ignore`.

    style="photo" gives every scene its own conditions, which prompts never show: a texture
    scale, 0-3 low-saturation clutter blobs (drawn over the canvas and partly over objects,
    labelled as canvas), a light gradient and colour cast, and a blur. Colour stays the cue of
    a class: the cast moves each channel by at most 12 %."""
    if not allowed:
        raise ValueError("a scene needs at least one allowed category")
    if style not in SCENE_STYLES:
        raise ValueError(f"style must be one of {SCENE_STYLES}, got {style!r}")
    rng = _rng(seed, "scene", key)
    image = photo_background(size, rng)
    canvas = ignore if background is None else background
    label = np.full((size, size), canvas, dtype=np.uint8)
    photo = style == "photo"
    period_scale = float(np.exp(rng.uniform(np.log(0.6), np.log(1.8)))) if photo else 1.0
    for _ in range(int(rng.integers(1, max_objects + 1))):
        index = int(allowed[int(rng.integers(len(allowed)))])
        look = parse_category(SHAPES_CATEGORIES[index])
        radius = size * rng.uniform(0.1, 0.3)
        cx, cy = _centre(size, radius * 0.6, False, rng)
        mask = shape_mask(look.shape, size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        paint_object(image, mask, look, rng, size, period_scale)
        label[mask] = index
    if not photo:
        return image.round().astype(np.uint8), label
    return _photo_conditions(image, label, canvas, size, rng)


def photo_conditions(image: np.ndarray, seed: int, key: str) -> np.ndarray:
    """A rendered (size, size, 3) uint8 image under the scenes' photo conditions (clutter, light,
    colour cast, blur; the texture scale is drawn at paint time and is not among them), drawn
    from (seed, key): what a camera does to an object, for CLIP pretraining that has seen
    photographs of the world as well as renders."""
    size = image.shape[0]
    photo, _ = _photo_conditions(image.astype(np.float32), None, 0, size, _rng(seed, "photo", key))
    return photo


def _photo_conditions(
    image: np.ndarray, label: np.ndarray | None, canvas: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    for _ in range(int(rng.integers(0, 4))):  # clutter: grey-brown blobs, small enough to leave objects readable
        radius = size * rng.uniform(0.04, 0.1)
        cx, cy = rng.uniform(0, size), rng.uniform(0, size)
        blob = shape_mask(SHAPES[int(rng.integers(len(SHAPES)))], size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        grey = rng.uniform(60, 200)
        image[blob] = np.asarray([grey * 1.05, grey, grey * 0.9], dtype=np.float32)
        if label is not None:
            label[blob] = canvas
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    a = rng.uniform(0, 2 * math.pi)
    light = rng.uniform(0.65, 1.25) * (1 + rng.uniform(0, 0.3) * (xx * math.cos(a) + yy * math.sin(a) - 0.5))
    cast = rng.uniform(0.88, 1.12, 3).astype(np.float32)
    image = np.clip(image * light[..., None] * cast, 0, 255)
    pil = Image.fromarray(image.round().astype(np.uint8))
    blur = rng.uniform(0, 1.2) * size / 128
    if blur > 0.2:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=blur))
    return np.asarray(pil, dtype=np.uint8), label
