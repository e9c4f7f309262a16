"""The demo dataset: a handful of images of one subject, drawn in code so git holds no binaries.

``builtin:demo`` (see :func:`trainers.data.resolve_data_path`) materializes it once in the cache.
Same seed -> byte-identical PNGs with the pinned Pillow/zlib build.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

_PALETTE = {"blue": (60, 110, 220), "green": (60, 170, 90), "pink": (240, 150, 190), "gray": (140, 140, 140),
            "teal": (40, 160, 170), "yellow": (240, 210, 70), "red": (200, 50, 50)}
_BODY, _BELLY, _HAT, _BAND = (240, 120, 30), (255, 205, 130), (95, 35, 140), (250, 215, 60)


def _draw_toy(px: int) -> Image.Image:
    """The demo subject, an orange round creature with big eyes and a purple top hat (RGBA)."""
    toy = Image.new("RGBA", (px, px), (0, 0, 0, 0))
    d, u, ink = ImageDraw.Draw(toy), px / 100, (40, 25, 20, 255)  # u: one percent of the sprite
    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (x0 * u, y0 * u, x1 * u, y1 * u)
    d.ellipse(box(28, 86, 46, 96), fill=ink)  # feet
    d.ellipse(box(54, 86, 72, 96), fill=ink)
    d.ellipse(box(18, 34, 82, 92), fill=_BODY, outline=ink, width=max(1, round(2 * u)))
    d.ellipse(box(34, 60, 66, 88), fill=_BELLY)
    for cx in (38, 62):  # eyes, pupils looking right so mirroring is visible
        d.ellipse(box(cx - 9, 44, cx + 9, 62), fill=(255, 255, 255, 255), outline=ink)
        d.ellipse(box(cx - 1, 49, cx + 7, 57), fill=ink)
    d.rectangle(box(22, 30, 78, 36), fill=_HAT)  # hat brim, crown and band
    d.rectangle(box(32, 4, 68, 31), fill=_HAT)
    d.rectangle(box(32, 22, 68, 27), fill=_BAND)
    return toy


def _background(kind: str, color: tuple[int, int, int], size: int) -> Image.Image:
    """A solid, vertical-gradient (colour to white) or striped (colour and white) background."""
    base = np.empty((size, size, 3), dtype=np.float64)
    base[:] = color
    if kind == "gradient":
        t = np.linspace(0.0, 1.0, size)[:, None, None]
        base = base * (1 - t) + 255.0 * t
    elif kind == "striped":
        base[:, (np.arange(size) // max(1, size // 8)) % 2 == 1] = 255.0
    return Image.fromarray(np.round(base).astype(np.uint8), mode="RGB")


def write_demo_dataset(dest: Path, *, n_images: int = 8, seed: int = 0, size: int = 128) -> Path:
    """Write ``n_images`` PNGs of "sks toy" in varied poses and backgrounds, each with a .txt caption.

    Same seed -> byte-identical files with the same Pillow/zlib build (the pinned pillow).
    """
    if n_images < 1 or size < 16:
        raise ValueError(f"write_demo_dataset needs n_images >= 1 and size >= 16, got {n_images}, {size}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # Mersenne Twister: same sequence on every platform and version
    names = sorted(_PALETTE)
    for i in range(n_images):
        kind = ("solid", "gradient", "striped")[i % 3]
        color = rng.choice(names)
        bg = _background(kind, _PALETTE[color], size)
        sprite = _draw_toy(256).resize((round(size * rng.uniform(0.45, 0.7)),) * 2, Image.Resampling.LANCZOS)
        sprite = sprite.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BICUBIC, expand=True)
        if rng.random() < 0.5:
            sprite = ImageOps.mirror(sprite)
        x = rng.randint(0, max(0, size - sprite.width))
        y = rng.randint(0, max(0, size - sprite.height))
        bg.paste(sprite, (x, y), sprite)
        where = {"solid": color, "gradient": f"{color} gradient", "striped": f"{color} and white striped"}[kind]
        bg.save(dest / f"toy_{i:02d}.png", format="PNG")
        caption = f"a photo of sks toy on a {where} background\n"
        (dest / f"toy_{i:02d}.txt").write_text(caption, encoding="utf-8")
    return dest
