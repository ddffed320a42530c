"""A PNG grid of sample images with their captions, so a person can look at the world."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

SCALE = 4
TEXT_LINES = 7
LINE_PX = 11


def write_contact_sheet(world_dir: str | Path, out_png: str | Path, count: int = 16, split: str = "val",
                        columns: int = 4) -> Path:
    files = sorted((Path(world_dir) / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {Path(world_dir) / split}")
    table = pq.read_table(files[0], columns=["image", "answer", "task"], filters=[("task", "=", "caption")])
    rows = table.slice(0, count).to_pylist()
    if not rows:
        raise ValueError(f"no caption rows in {files[0]}")
    first = Image.open(io.BytesIO(rows[0]["image"]))
    tile_w = first.width * SCALE
    tile_h = first.height * SCALE + TEXT_LINES * LINE_PX + 6
    wrap = max(16, tile_w // 6)
    n_rows = (len(rows) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tile_w + 8) + 8, n_rows * (tile_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, row in enumerate(rows):
        x = 8 + (i % columns) * (tile_w + 8)
        y = 8 + (i // columns) * (tile_h + 8)
        img = Image.open(io.BytesIO(row["image"])).convert("RGB")
        sheet.paste(img.resize((tile_w, img.height * SCALE), Image.NEAREST), (x, y))
        lines = textwrap.wrap(row["answer"], wrap)[:TEXT_LINES]
        for k, line in enumerate(lines):
            draw.text((x, y + img.height * SCALE + 3 + k * LINE_PX), line, fill=(0, 0, 0), font=font)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
