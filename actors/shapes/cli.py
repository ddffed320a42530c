"""`python -m actors.shapes --out DIR --size N --seed S`: generate the shapes world."""
from __future__ import annotations

import json
import sys
import time

import click

from actors.shapes.contact_sheet import write_contact_sheet
from actors.shapes.generate import GenerateConfig, generate_world
from actors.shapes.world import WorldConfig


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--size", default=2000, show_default=True, type=click.IntRange(3, 10_000_000),
              help="Number of images (each yields caption, VQA, POPE and preference records).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--image-size", default=48, show_default=True, type=click.IntRange(12, 1024))
@click.option("--patch-size", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--min-objects", default=1, show_default=True, type=click.IntRange(1, 4))
@click.option("--max-objects", default=4, show_default=True, type=click.IntRange(1, 4))
@click.option("--noisy-rate", default=0.15, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Share of training captions that mention one absent object (val/test stay clean).")
@click.option("--val-frac", default=0.1, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True))
@click.option("--test-frac", default=0.1, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True))
@click.option("--chat-turns", default=6, show_default=True, type=click.IntRange(1, None),
              help="Turns per training chat (each image's questions, cut into chats of this many).")
@click.option("--shard-rows", default=20000, show_default=True, type=click.IntRange(1, None))
@click.option("--contact-sheet", "sheet", default=0, show_default=True, type=click.IntRange(0, 256),
              help="Also write contact_sheet.png with this many sample images and captions.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(out_dir, size, seed, image_size, patch_size, min_objects, max_objects, noisy_rate, val_frac,
         test_frac, chat_turns, shard_rows, sheet, quiet):
    """Generate the synthetic shapes world as Parquet shards (train/val/test) plus its tokenizer."""
    try:
        world = WorldConfig(image_size=image_size, patch_size=patch_size, min_objects=min_objects,
                            max_objects=max_objects)
        gen = GenerateConfig(size=size, seed=seed, noisy_rate=noisy_rate, val_frac=val_frac,
                             test_frac=test_frac, shard_rows=shard_rows, chat_turns=chat_turns)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    start = time.perf_counter()
    manifest = generate_world(out_dir, gen, world, progress=not quiet)
    rows = {s: v["rows"] for s, v in manifest["splits"].items()}
    click.echo(f"wrote {sum(rows.values())} records {json.dumps(rows)} to {out_dir} "
               f"in {time.perf_counter() - start:.1f}s")
    if sheet:
        path = write_contact_sheet(out_dir, f"{out_dir}/contact_sheet.png", count=sheet)
        click.echo(f"contact sheet: {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
