"""Write the shapes world as Parquet shards per split, plus its tokenizer and a manifest."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from actors.schema import RECORD_SCHEMA, SCHEMA_VERSION
from actors.shapes.tasks import CHAT_TURNS, POPE_KINDS, scene_records
from actors.shapes.tokenizer import build_tokenizer, save_tokenizer
from actors.shapes.world import WorldConfig, cell_labels, combo_prior, png_bytes, render, sample_scene

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class GenerateConfig:
    size: int = 2000  # images; each image yields several records
    seed: int = 0
    noisy_rate: float = 0.15
    val_frac: float = 0.1
    test_frac: float = 0.1
    shard_rows: int = 20000
    chat_turns: int = CHAT_TURNS  # turns per training chat (actors.shapes.tasks.chat_records)

    def __post_init__(self) -> None:
        if self.size < 3:
            raise ValueError(f"size must be >= 3 images (one per split), got {self.size}")
        if not 0.0 <= self.noisy_rate <= 1.0:
            raise ValueError(f"noisy_rate must be in [0, 1], got {self.noisy_rate}")
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(
                f"val_frac and test_frac must be in (0, 1) with a sum below 1, got {self.val_frac}, {self.test_frac}"
            )
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")
        if self.chat_turns < 1:
            raise ValueError(f"chat_turns must be >= 1, got {self.chat_turns}")


def split_sizes(size: int, val_frac: float, test_frac: float) -> dict[str, int]:
    n_val = max(1, round(size * val_frac))
    n_test = max(1, round(size * test_frac))
    return {"train": size - n_val - n_test, "val": n_val, "test": n_test}


def image_rows(index: int, split: str, gen: GenerateConfig, world: WorldConfig, prior: dict) -> list[dict]:
    """Every record of image `index`; its own seeded generator makes each image independent of the rest."""
    rng = np.random.default_rng([gen.seed, index])
    scene = sample_scene(rng, world)
    image = png_bytes(render(scene, world))
    image_id = f"{split}-{index:07d}"
    objects = [dict(shape=o.shape, colour=o.colour, size=o.size, position=o.position) for o in scene.objects]
    cells = cell_labels(scene)
    recs = scene_records(scene, rng, train=split == "train", noisy_rate=gen.noisy_rate, prior=prior,
                         pope_kind=POPE_KINDS[index % len(POPE_KINDS)], chat_turns=gen.chat_turns)
    rows = []
    for j, r in enumerate(recs):
        rows.append({
            "id": f"{image_id}-{j:02d}-{r['task']}", "image_id": image_id, "image": image,
            "messages": r["messages"], "task": r["task"], "subtask": r["subtask"], "answer": r["answer"],
            "chosen": r.get("chosen"), "rejected": r.get("rejected"), "noisy": r["noisy"], "split": split,
            "objects": objects, **cells,
        })
    return rows


def _write_shards(rows: list[dict], out: Path, split: str, shard_rows: int) -> list[str]:
    (out / split).mkdir(parents=True, exist_ok=True)
    names = []
    for k, start in enumerate(range(0, len(rows), shard_rows)):
        table = pa.Table.from_pylist(rows[start:start + shard_rows], schema=RECORD_SCHEMA)
        name = f"{split}/part-{k:05d}.parquet"
        pq.write_table(table, out / name, compression="zstd", row_group_size=5000)
        names.append(name)
    return names


def generate_world(out_dir: str | Path, gen: GenerateConfig, world: WorldConfig = WorldConfig(),
                   progress: bool = True) -> dict:
    """Generate all splits under `out_dir`; the same arguments give byte-identical files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prior = combo_prior(world.popularity_skew)
    sizes = split_sizes(gen.size, gen.val_frac, gen.test_frac)
    manifest: dict = {"schema_version": SCHEMA_VERSION, "generate": asdict(gen), "world": asdict(world),
                      "splits": {}}
    index = 0
    bar = tqdm(total=gen.size, desc="shapes world", unit="img", disable=not progress)
    for split in SPLITS:
        rows: list[dict] = []
        for _ in range(sizes[split]):
            rows.extend(image_rows(index, split, gen, world, prior))
            index += 1
            bar.update(1)
        files = _write_shards(rows, out, split, gen.shard_rows)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["task"]] = counts.get(r["task"], 0) + 1
        manifest["splits"][split] = {"images": sizes[split], "rows": len(rows), "tasks": counts, "files": files}
    bar.close()
    save_tokenizer(build_tokenizer(), out / "tokenizer")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
