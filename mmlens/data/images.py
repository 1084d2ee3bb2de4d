"""Images named in configs: a file, or a generated test image ``generated:COLOR[-SHAPE]``.

>>> make_image("generated:red-square").size      # a red square on a light gray ground, 64 x 64 px
(64, 64)

A generated image is one flat colour (``plain``, the default) or a shape of that colour on a light
gray ground. :data:`COLORS` maps colour names to RGB (0..255); :data:`SHAPES` lists the shapes.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

GENERATED = "generated:"
"""The prefix of a generated image's name."""
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 40),
    "orange": (230, 130, 30),
    "purple": (130, 50, 160),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
}
SHAPES = ("plain", "square", "circle", "stripes")
GROUND = (220, 220, 220)
"""The background RGB of a generated shape."""


def image_path(spec: str, folder: str | Path | None = None) -> Path:
    """The file an image name points to; relative paths start at ``folder`` (e.g. a config file's)."""
    path = Path(spec).expanduser()
    return Path(folder) / path if folder is not None and not path.is_absolute() else path


def image_problem(spec: str, folder: str | Path | None = None) -> str | None:
    """Why ``spec`` names no image (an unknown colour or shape, a missing file), or None when it does."""
    if spec.startswith(GENERATED):
        color, _, shape = spec[len(GENERATED) :].partition("-")
        if color in COLORS and (not shape or shape in SHAPES):
            return None
        return (
            f"unknown generated image {spec!r}; use generated:COLOR or generated:COLOR-SHAPE with COLOR in "
            f"{', '.join(COLORS)} and SHAPE in {', '.join(SHAPES)}"
        )
    if image_path(spec, folder).is_file():
        return None
    return (
        f"image file {image_path(spec, folder)} not found (relative paths start at the config file's folder), "
        "and it is not generated:COLOR[-SHAPE]"
    )


def make_image(spec: str, folder: str | Path | None = None, size: int = 64) -> Image.Image:
    """An RGB image: ``generated:COLOR[-SHAPE]`` drawn at ``size`` x ``size`` px, else the file ``spec``."""
    if not spec.startswith(GENERATED):
        return Image.open(image_path(spec, folder)).convert("RGB")
    color, _, shape = spec[len(GENERATED) :].partition("-")
    return draw_shape(COLORS[color], shape or "plain", size)


def draw_shape(rgb: tuple[int, int, int], shape: str, size: int = 64) -> Image.Image:
    """``shape`` (one of :data:`SHAPES`) in colour ``rgb``, centred, half the side, on :data:`GROUND`;
    ``plain`` fills the whole image."""
    image = Image.new("RGB", (size, size), rgb if shape == "plain" else GROUND)
    draw = ImageDraw.Draw(image)
    lo, hi = size // 4, size - size // 4
    if shape == "square":
        draw.rectangle([lo, lo, hi - 1, hi - 1], fill=rgb)
    elif shape == "circle":
        draw.ellipse([lo, lo, hi - 1, hi - 1], fill=rgb)
    elif shape == "stripes":
        for x in range(0, size, size // 8):
            draw.rectangle([x, 0, x + size // 16 - 1, size - 1], fill=rgb)
    return image
