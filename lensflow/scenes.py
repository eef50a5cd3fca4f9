"""Synthetic aerial scenes: what a drone sees, drawn with numpy and Pillow only.

Every scene is a pure function of ``(cls, seed, size)``: the same arguments give the
same pixels. Scenes are drawn on a small canvas (longest side at most ``BASE_MAX``),
then upscaled with fine grain added, so a 12-MP "drone photo" costs about as much to
draw as a thumbnail (its JPEG encoding is the expensive part).

The classes share colours on purpose (green fields and forests, grey roads and roofs,
dark-blue water and solar panels); lighting, haze, noise, blur, scale, orientation and
small distractors (a tree in a field, a track through a forest) make the task learnable
from texture and layout, but not trivial.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("field", "forest", "water", "road", "buildings", "solar_farm")

BASE_MAX = 192  # longest side of the canvas scenes are drawn on
DEFAULT_SIZE = (96, 96)

Rgb = tuple[int, int, int]


def _jitter(rng: np.random.Generator, rgb: Rgb, amount: int = 15) -> Rgb:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)
    return r, g, b


def _pick(rng: np.random.Generator, palette: list[Rgb], amount: int = 15) -> Rgb:
    return _jitter(rng, palette[int(rng.integers(len(palette)))], amount)


GRASS: list[Rgb] = [(96, 128, 62), (120, 140, 80), (80, 110, 55), (140, 150, 90)]
SOIL: list[Rgb] = [(130, 100, 70), (150, 120, 85), (110, 85, 60), (160, 140, 110)]
CONCRETE: list[Rgb] = [(150, 150, 145), (170, 165, 155), (125, 125, 120)]
TREE: list[Rgb] = [(40, 80, 35), (55, 95, 45), (35, 65, 30), (70, 100, 50)]


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Values in [0, 1] varying smoothly over about ``cells`` blobs across the canvas."""
    cw, ch = max(2, cells), max(2, round(cells * h / max(w, 1)))
    coarse = Image.fromarray((rng.random((ch, cw)) * 255).astype(np.uint8), "L")
    return np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0


def _rotated(
    w: int, h: int, angle: float, fill: Rgb, draw_fn: Callable[[ImageDraw.ImageDraw, int], None]
) -> Image.Image:
    """Draw on a square canvas big enough for any rotation, rotate it, crop the centre."""
    d = int(math.ceil(math.hypot(w, h))) + 2
    canvas = Image.new("RGB", (d, d), fill)
    draw_fn(ImageDraw.Draw(canvas), d)
    canvas = canvas.rotate(angle, resample=Image.BILINEAR)
    left, top = (d - w) // 2, (d - h) // 2
    return canvas.crop((left, top, left + w, top + h))


def _trees(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    w: int,
    h: int,
    n: int,
    u: float,
    shadows: bool = True,
) -> None:
    radii = rng.uniform(2.5, 6.0, n) * u
    xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
    palette = np.array(TREE, np.int64)
    colours = palette[rng.integers(len(TREE), size=n)] + rng.integers(-18, 19, size=(n, 3))
    colours = colours.clip(0, 255).tolist()
    for x, y, r, c in zip(xs.tolist(), ys.tolist(), radii.tolist(), colours, strict=True):
        if shadows:
            s = 0.4 * r
            draw.ellipse((x - r + s, y - r + s, x + r + s, y + r + s), fill=(25, 35, 20))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(c))


def _field(rng: np.random.Generator, w: int, h: int, u: float) -> Image.Image:
    crop = _pick(rng, [(85, 135, 55), (110, 150, 60), (190, 170, 95), (150, 160, 70)], 18)
    soil = _pick(rng, SOIL, 15)
    period = rng.uniform(3.5, 9.0) * u
    fill = rng.uniform(0.35, 0.7)

    def rows(draw: ImageDraw.ImageDraw, d: int) -> None:
        y = rng.uniform(0, period)
        while y < d:
            draw.rectangle((0, y, d, y + period * fill), fill=_jitter(rng, crop, 6))
            y += period
        if rng.random() < 0.3:  # a tractor track across the rows
            x = rng.uniform(0.2, 0.8) * d
            draw.rectangle((x, 0, x + 2.5 * u, d), fill=soil)

    img = _rotated(w, h, rng.uniform(0, 180), soil, rows)
    if rng.random() < 0.25:
        _trees(ImageDraw.Draw(img), rng, w, h, int(rng.integers(1, 5)), u)
    return img


def _forest(rng: np.random.Generator, w: int, h: int, u: float) -> Image.Image:
    dark = np.array(_pick(rng, [(25, 45, 22), (35, 55, 28), (45, 60, 35)], 10), np.float32)
    canopy = _smooth_noise(rng, w, h, max(4, round(w / (5 * u))))[..., None]
    img = Image.fromarray((dark * (0.7 + 0.9 * canopy)).clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    density = rng.uniform(0.3, 0.8)
    _trees(draw, rng, w, h, int(density * w * h / (40 * u * u)), u, shadows=False)
    if rng.random() < 0.2:  # autumn crowns
        for _ in range(int(rng.integers(3, 12))):
            r = rng.uniform(2.5, 6.0) * u
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            draw.ellipse(
                (x - r, y - r, x + r, y + r), fill=_pick(rng, [(160, 120, 50), (140, 90, 40)])
            )
    if rng.random() < 0.2:  # a forest track
        return _overlay_strip(rng, img, _pick(rng, SOIL), rng.uniform(2, 4) * u)
    return img


def _overlay_strip(
    rng: np.random.Generator, img: Image.Image, color: Rgb, width: float
) -> Image.Image:
    w, h = img.size
    mask = _rotated(
        w,
        h,
        rng.uniform(0, 180),
        (0, 0, 0),
        lambda draw, d: draw.rectangle(
            (0, d / 2 - width / 2, d, d / 2 + width / 2), fill=(255, 255, 255)
        ),
    ).convert("L")
    return Image.composite(Image.new("RGB", (w, h), color), img, mask)


def _water(rng: np.random.Generator, w: int, h: int, u: float) -> Image.Image:
    base = np.array(
        _pick(rng, [(35, 75, 120), (45, 95, 140), (30, 60, 90), (70, 95, 90)], 15), np.float32
    )
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    wavelength = rng.uniform(3.0, 8.0) * u
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) * (2 * math.pi / wavelength)
    warp = _smooth_noise(rng, w, h, 4) * rng.uniform(2, 8)
    ripples = np.sin(phase + warp) * rng.uniform(3, 10)
    shade = (_smooth_noise(rng, w, h, 3) - 0.5) * rng.uniform(10, 40)
    arr = base + (ripples + shade)[..., None]
    if rng.random() < 0.35:  # a shoreline
        land = np.array(_pick(rng, GRASS + SOIL), np.float32)
        edge = _smooth_noise(rng, w, h, 3) + (xx / w) * rng.choice([-1.0, 1.0])
        mask = (edge > np.quantile(edge, rng.uniform(0.7, 0.9)))[..., None]
        arr = np.where(mask, land, arr)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:  # sun glints
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 10))):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.5, 1.5) * u
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(220, 225, 230))
    return img


def _road(rng: np.random.Generator, w: int, h: int, u: float) -> Image.Image:
    ground = _pick(rng, GRASS + SOIL + CONCRETE[:1])
    asphalt = _pick(rng, [(70, 70, 72), (90, 90, 92), (55, 55, 60)], 10)
    mark = (235, 235, 230) if rng.random() < 0.7 else (220, 190, 60)
    width = rng.uniform(16, 32) * u
    dash, gap = rng.uniform(4, 8) * u, rng.uniform(3, 8) * u
    cross = rng.random() < 0.3

    def one_road(draw: ImageDraw.ImageDraw, d: int, vertical: bool) -> None:
        c = d / 2 + rng.uniform(-0.15, 0.15) * d
        a, b = c - width / 2, c + width / 2

        def rect(p0: float, p1: float, q0: float, q1: float, fill: Rgb) -> None:
            draw.rectangle((q0, p0, q1, p1) if vertical else (p0, q0, p1, q1), fill=fill)

        rect(0, d, a, b, asphalt)
        if rng.random() < 0.6:
            rect(0, d, a + u, a + 2 * u, mark)
            rect(0, d, b - 2 * u, b - u, mark)
        x = rng.uniform(0, dash + gap)
        while x < d:
            rect(x, x + dash, c - 0.6 * u, c + 0.6 * u, mark)
            x += dash + gap
        for _ in range(int(rng.integers(0, 4))):  # cars
            x, lane = rng.uniform(0, d), rng.choice([a + width / 4, b - width / 4])
            rect(
                x,
                x + 7 * u,
                lane - 2 * u,
                lane + 2 * u,
                _pick(rng, [(200, 30, 30), (230, 230, 230), (30, 30, 40), (40, 70, 160)]),
            )

    def draw_fn(draw: ImageDraw.ImageDraw, d: int) -> None:
        one_road(draw, d, vertical=False)
        if cross:
            one_road(draw, d, vertical=True)

    img = _rotated(w, h, rng.uniform(0, 180), ground, draw_fn)
    if rng.random() < 0.3:
        _trees(ImageDraw.Draw(img), rng, w, h, int(rng.integers(1, 6)), u)
    return img


def _buildings(rng: np.random.Generator, w: int, h: int, u: float) -> Image.Image:
    ground = _pick(rng, GRASS + CONCRETE)
    roofs = [(170, 80, 60), (120, 120, 125), (80, 80, 85), (140, 100, 70), (200, 200, 195)]
    shadow = rng.uniform(1.5, 4.0) * u

    def draw_fn(draw: ImageDraw.ImageDraw, d: int) -> None:
        pitch = rng.uniform(26, 42) * u  # city block spacing
        y = rng.uniform(-pitch, 0)
        while y < d:
            x = rng.uniform(-pitch, 0)
            while x < d:
                if rng.random() < 0.8:
                    bw, bh = rng.uniform(0.4, 0.8) * pitch, rng.uniform(0.4, 0.8) * pitch
                    draw.rectangle(
                        (x + shadow, y + shadow, x + bw + shadow, y + bh + shadow),
                        fill=(40, 40, 40),
                    )
                    roof = _pick(rng, roofs, 15)
                    draw.rectangle((x, y, x + bw, y + bh), fill=roof)
                    if rng.random() < 0.5:  # ridge
                        draw.line(
                            (x, y + bh / 2, x + bw, y + bh / 2),
                            fill=_jitter(rng, roof, 30),
                            width=max(1, round(u)),
                        )
                x += pitch * rng.uniform(0.9, 1.1)
            y += pitch * rng.uniform(0.9, 1.1)

    img = _rotated(w, h, rng.uniform(0, 180), ground, draw_fn)
    if rng.random() < 0.4:
        _trees(ImageDraw.Draw(img), rng, w, h, int(rng.integers(1, 8)), u)
    return img


def _solar_farm(rng: np.random.Generator, w: int, h: int, u: float) -> Image.Image:
    ground = _pick(rng, GRASS + SOIL)
    panel = _pick(rng, [(30, 45, 90), (25, 35, 60), (45, 60, 110), (60, 65, 80)], 12)
    frame = _jitter(rng, tuple((np.array(panel) + 60).clip(0, 255).tolist()), 20)
    row_h, gap = rng.uniform(5, 10) * u, rng.uniform(2, 6) * u
    cell = rng.uniform(4, 9) * u

    def draw_fn(draw: ImageDraw.Draw, d: int) -> None:
        y = rng.uniform(0, row_h + gap)
        while y < d:
            draw.rectangle((0, y, d, y + row_h), fill=panel)
            draw.line((0, y + row_h / 2, d, y + row_h / 2), fill=frame, width=1)
            x = rng.uniform(0, cell)
            while x < d:
                draw.line((x, y, x, y + row_h), fill=frame, width=1)
                x += cell
            y += row_h + gap

    return _rotated(w, h, rng.uniform(0, 180), ground, draw_fn)


_DRAW: dict[str, Callable[[np.random.Generator, int, int, float], Image.Image]] = {
    "field": _field,
    "forest": _forest,
    "water": _water,
    "road": _road,
    "buildings": _buildings,
    "solar_farm": _solar_farm,
}


def _base_size(size: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    k = min(1.0, BASE_MAX / max(w, h))
    return max(8, round(w * k)), max(8, round(h * k))


def _photographic(rng: np.random.Generator, img: Image.Image) -> np.ndarray:
    """Lighting, colour cast, haze and sensor noise, as float32 RGB."""
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.7, 1.3) * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    mean = arr.mean()
    arr = (arr - mean) * rng.uniform(0.75, 1.25) + mean  # contrast
    arr = arr * gain
    haze = rng.uniform(0.0, 0.3) if rng.random() < 0.4 else 0.0
    arr = arr * (1 - haze) + 200.0 * haze
    sigma = rng.uniform(2.0, 9.0)
    arr += rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return arr


def render_scene(cls: str, seed: int, size: tuple[int, int] = DEFAULT_SIZE) -> Image.Image:
    """An RGB aerial scene of class ``cls``; deterministic in ``(cls, seed, size)``."""
    if cls not in _DRAW:
        raise ValueError(f"unknown scene class {cls!r}; known: {', '.join(CLASSES)}")
    w, h = int(size[0]), int(size[1])
    bw, bh = _base_size((w, h))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, CLASSES.index(cls)])
    u = min(bw, bh) / 96 * rng.uniform(0.7, 1.4)  # feature scale: altitude
    img = _DRAW[cls](rng, bw, bh, u)
    if rng.random() < 0.3:  # out of focus
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0) * u))
    arr = _photographic(rng, img)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if (bw, bh) == (w, h):
        return img
    return _add_grain(rng, img.resize((w, h), Image.BILINEAR))


def _add_grain(rng: np.random.Generator, img: Image.Image, tile: int = 256) -> Image.Image:
    """Fine sensor grain on a large image: a seeded noise tile repeated, added in C."""
    grain = rng.normal(128.0, 6.0, size=(tile, tile, 3)).clip(0, 255).astype(np.uint8)
    tile_img = Image.fromarray(grain, "RGB")
    w, h = img.size
    noise = Image.new("RGB", (w, h))
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            noise.paste(tile_img, (x, y))
    return ImageChops.add(img, noise, scale=1.0, offset=-128)


def scene_jpeg(
    cls: str, seed: int, size: tuple[int, int] = DEFAULT_SIZE, quality: int = 90
) -> bytes:
    """``render_scene`` encoded as a JPEG."""
    buf = io.BytesIO()
    render_scene(cls, seed, size).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def labelled_set(
    n_per_class: int, seed: int, size: tuple[int, int] = DEFAULT_SIZE, quality: int = 90
) -> list[tuple[str, bytes]]:
    """``n_per_class`` JPEG scenes of every class, as ``(class, jpeg)``; class-interleaved.

    Different ``seed`` values give disjoint scenes (for ``n_per_class`` below 100,000),
    so a training set and a holdout drawn with different seeds never share an image.
    """
    out: list[tuple[str, bytes]] = []
    for i in range(n_per_class):
        for cls in CLASSES:
            out.append((cls, scene_jpeg(cls, seed * 100_000 + i, size, quality)))
    return out
