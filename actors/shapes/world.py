"""Scenes of 1-4 shapes on a 3x3 grid, rendered to small RGB images.

Grid cells are aligned with the vision encoder's patches (16 px cells, 8 px patches at 48x48), so
each object lies in a known block of patches: that is what makes per-cell pretraining labels exact.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from actors.shapes.vocab import BACKGROUND, COLOUR_NAMES, COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, SIZES

GRID = 3
# Radius as a fraction of the cell side; small and large are far enough apart to tell at 16 px cells.
RADIUS = {"small": 0.27, "large": 0.42}


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 48
    patch_size: int = 8
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    jitter_px: int = 1
    # Zipf exponent of the prior over (colour, shape) combinations: makes POPE's "popular" negatives real.
    popularity_skew: float = 0.6

    def __post_init__(self) -> None:
        if self.image_size < 12 or self.image_size % GRID:
            raise ValueError(f"image_size must be a multiple of {GRID} and >= 12, got {self.image_size}")
        cell = self.image_size // GRID
        if self.patch_size < 1 or cell % self.patch_size:
            raise ValueError(
                f"patch_size {self.patch_size} must divide the grid cell ({cell} px = image_size/{GRID}) "
                "so cells align with patches"
            )
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                f"got {self.min_objects}..{self.max_objects}"
            )
        if self.jitter_px < 0 or self.jitter_px > cell // 8:
            raise ValueError(f"jitter_px must be in [0, {cell // 8}] for {cell} px cells, got {self.jitter_px}")

    @property
    def cell_px(self) -> int:
        return self.image_size // GRID

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # row-major index into POSITIONS

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def kind(self) -> tuple[str, str]:
        """What a yes/no probe asks about: colour and shape (size is not part of the name)."""
        return (self.colour, self.shape)

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # sorted by cell: the order captions list them in
    offsets: tuple[tuple[int, int], ...]  # per-object centre jitter in pixels

    def at(self, cell: int) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)


def combo_prior(skew: float) -> dict[tuple[str, str], float]:
    """Fixed, deterministic popularity of each (colour, shape): rank r has weight (r+1)^-skew."""
    combos = [(c, s) for s in SHAPES for c in COLOUR_NAMES]
    # A fixed interleaving so popularity is not simply "the first colour".
    order = sorted(combos, key=lambda cs: ((COLOUR_NAMES.index(cs[0]) * 5 + SHAPES.index(cs[1]) * 7) % 24, cs))
    weights = np.array([(r + 1) ** -skew for r in range(len(order))])
    weights /= weights.sum()
    return {cs: float(w) for cs, w in zip(order, weights)}


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=n, replace=False))
    prior = combo_prior(cfg.popularity_skew)
    combos = list(prior)
    probs = np.array([prior[c] for c in combos])
    objects, offsets = [], []
    for cell in cells:
        colour, shape = combos[int(rng.choice(len(combos), p=probs))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        objects.append(Obj(shape=shape, colour=colour, size=size, cell=cell))
        j = cfg.jitter_px
        offsets.append((int(rng.integers(-j, j + 1)), int(rng.integers(-j, j + 1))))
    return Scene(objects=tuple(objects), offsets=tuple(offsets))


def object_centre(obj: Obj, offset: tuple[int, int], cfg: WorldConfig) -> tuple[int, int]:
    cell = cfg.cell_px
    row, col = divmod(obj.cell, GRID)
    return col * cell + cell // 2 + offset[0], row * cell + cell // 2 + offset[1]


def render(scene: Scene, cfg: WorldConfig) -> Image.Image:
    img = Image.new("RGB", (cfg.image_size, cfg.image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj, off in zip(scene.objects, scene.offsets):
        cx, cy = object_centre(obj, off, cfg)
        r = RADIUS[obj.size] * cfg.cell_px
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            h = r * 0.85  # similar area to the circle
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif obj.shape == "triangle":
            k = math.sqrt(3) / 2
            draw.polygon([(cx, cy - r), (cx - k * r, cy + r / 2), (cx + k * r, cy + r / 2)], fill=fill)
        elif obj.shape == "cross":
            t = max(1.0, r * 0.35)
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(f"unknown shape {obj.shape!r}")
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def cell_labels(scene: Scene) -> dict[str, list[int]]:
    """Per-cell targets for pretraining the vision encoder: -1 marks an empty cell."""
    present, shape, colour, size = [0] * 9, [-1] * 9, [-1] * 9, [-1] * 9
    for o in scene.objects:
        present[o.cell] = 1
        shape[o.cell] = SHAPES.index(o.shape)
        colour[o.cell] = COLOUR_NAMES.index(o.colour)
        size[o.cell] = SIZES.index(o.size)
    return {"cell_present": present, "cell_shape": shape, "cell_colour": colour, "cell_size": size}
