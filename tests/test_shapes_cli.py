"""The generator's command line: determinism, clear errors, the contact sheet."""
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from actors.shapes.cli import main

REPO = Path(__file__).resolve().parents[1]


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    runner = CliRunner()
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        res = runner.invoke(main, ["--out", str(tmp_path / name), "--size", "40", "--seed", str(seed), "--quiet"])
        assert res.exit_code == 0, res.output
    a, b, c = (digest_tree(tmp_path / n) for n in "abc")
    assert a == b and len(a) >= 6
    assert a["train/part-00000.parquet"] != c["train/part-00000.parquet"]


@pytest.mark.parametrize("args, message", [
    (["--size", "0"], "--size"),
    (["--patch-size", "5"], "patch_size 5 must divide"),
    (["--noisy-rate", "1.5"], "--noisy-rate"),
    (["--min-objects", "3", "--max-objects", "2"], "min_objects <= max_objects"),
    (["--val-frac", "0.6", "--test-frac", "0.6"], "sum below 1"),
])
def test_out_of_range_arguments_give_a_clear_error(tmp_path, args, message):
    res = CliRunner().invoke(main, ["--out", str(tmp_path / "w"), "--quiet", *args])
    assert res.exit_code == 2
    assert message in res.output
    assert not (tmp_path / "w" / "train").exists()


def test_contact_sheet(tmp_path):
    res = CliRunner().invoke(main, ["--out", str(tmp_path), "--size", "100", "--contact-sheet", "8", "--quiet"])
    assert res.exit_code == 0, res.output
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.width > 4 * 48 * 4 and sheet.height > 2 * 48 * 4
    # Not blank: the tiles carry coloured pixels.
    assert len(np.unique(np.asarray(sheet.convert("RGB")).reshape(-1, 3), axis=0)) > 10


def test_module_entry_point_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "actors.shapes", "--out", str(tmp_path), "--size", "6",
                          "--chat-turns", "100", "--quiet"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote 58 records" in out.stdout  # 6 images x 9 records + one chat per training image (4)


def test_nothing_named_datasets_is_importable_from_the_project():
    assert not list((REPO / "datasets").rglob("*.py"))
    spec = importlib.util.find_spec("datasets")
    assert spec is None or REPO not in Path(spec.origin or "/").resolve().parents
