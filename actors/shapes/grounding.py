"""Which grid cell each answer word of a shapes-world chat is about: the targets of the grounding loss.

A small LM trained only on next-token CE binds "where is the red circle?" to a neighbour of the red
circle in 4-object images (docs/training.md): the attention that should pick the object's image
tokens is not sharp enough, and CE alone does not make it so in the demo's budget. The world knows
which cell every place word and every caption attribute refers to, so the teacher stage can say it:
an answer that names a place ("bottom right") is about that cell, and so is every word of a caption
phrase "small red circle at the bottom right". `student.losses.grounding` turns these targets into a
loss on the attention of the positions that predict those words.

Pure functions over token ids: no tokenizer at call time, only its id -> word table.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from actors.columns import IGNORE_INDEX
from actors.shapes.vocab import COLOUR_NAMES, POSITIONS, SHAPES, SIZES
from actors.shapes.world import GRID

__all__ = ["GRID", "patch_cells", "token_words", "grounding_targets", "question_cells"]


def patch_cells(side: int) -> np.ndarray:
    """[side*side]: the grid cell (row-major, 0..8) of each row-major patch."""
    if side % GRID:
        raise ValueError(f"patches per side ({side}) must be a multiple of the {GRID}x{GRID} grid")
    r = np.arange(side) // (side // GRID)
    return (r[:, None] * GRID + r[None, :]).reshape(-1)


def token_words(tokenizer) -> list[str]:
    """The id -> word table `grounding_targets` reads (byte-level BPE's space marker stripped).

    Every word the targets look for must be one token, or a phrase could not be found by its ids."""
    table = [t.lstrip("Ġ▁ ") if t is not None else "" for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    known = set(table)
    words = set(COLOUR_NAMES + SHAPES + SIZES) | {w for p in POSITIONS for w in p.split()} | {"at", "the"}
    missing = sorted(w for w in words if w not in known)
    if missing:
        raise ValueError(f"grounding needs each shapes-world word as one token; the tokenizer splits {missing}")
    return table


def _place(words: list[str], i: int) -> tuple[int, int] | None:
    """(cell, number of words) of the place name starting at words[i], longest name first."""
    for n in (2, 1):
        name = " ".join(words[i:i + n])
        if len(words[i:i + n]) == n and name in POSITIONS:
            return POSITIONS.index(name), n
    return None


def _span_targets(words: list[str]) -> list[tuple[int, int]]:
    """(index within the span of a word to predict, its cell) for one answer span."""
    content = [w for w in words if w and not w.startswith("<")]
    if " ".join(content) in POSITIONS:  # "where is X?": the whole answer is a place
        cell = POSITIONS.index(" ".join(content))
        return [(i, cell) for i, w in enumerate(words) if w and not w.startswith("<")]
    out = []
    for i in range(len(words) - 5):  # a caption phrase: size colour shape at the PLACE
        if (words[i] in SIZES and words[i + 1] in COLOUR_NAMES and words[i + 2] in SHAPES
                and words[i + 3] == "at" and words[i + 4] == "the"):
            place = _place(words, i + 5)
            if place is not None:
                cell, n = place
                out += [(i + k, cell) for k in (0, 1, 2)] + [(i + 5 + k, cell) for k in range(n)]
    return out


def grounding_targets(input_ids: np.ndarray, labels: np.ndarray, words: Sequence[str], image_token_id: int,
                      side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, query position, cell) of every grounded answer word in a batch [B, T].

    The query position is the one whose logits predict the word (t - 1 for the word at t). Rows
    without exactly side*side image tokens (no image, or several) have no targets."""
    rows, queries, cells = [], [], []
    input_ids, labels = np.asarray(input_ids), np.asarray(labels)
    for b in range(input_ids.shape[0]):
        if int((input_ids[b] == image_token_id).sum()) != side * side:
            continue
        answer = labels[b] != IGNORE_INDEX
        t = 0
        while t < len(answer):
            if not answer[t]:
                t += 1
                continue
            end = t
            while end < len(answer) and answer[end]:
                end += 1
            span = [words[int(i)] if 0 <= int(i) < len(words) else "" for i in labels[b, t:end]]
            for i, cell in _span_targets(span):
                if t + i >= 1:
                    rows.append(b)
                    queries.append(t + i - 1)
                    cells.append(cell)
            t = end
    as_long = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return as_long(rows), as_long(queries), as_long(cells)


def question_cells(question: str, cells: dict) -> list[int]:
    """The cells a question's answer is about, from the image's per-cell labels (`world.cell_labels`):
    "what colour is the S (at the P)?", "what shape is at the P?", "is the C S (at the P) small or
    large?", and "is there a C S in the image?" (every C S; none when the answer is no). [] for the
    rest (count, where-is, captions: `grounding_targets` reads those from the answer's text).

    What text-only targets cannot reach: "what colour is the square?" names no place. Used by the
    probe (bench/teacher_position_probe.py --ground-questions); the stage needs the labels in its rows."""
    words = question.replace("?", " ?").split()
    text = " ".join(words)

    def place() -> list[int]:
        if " at the " not in text:
            return []
        name = text.rsplit(" at the ", 1)[1].replace(" small or large", "").replace(" ?", "").strip()
        return [POSITIONS.index(name)] if name in POSITIONS else []

    def match(colour: str | None = None, shape: str | None = None) -> list[int]:
        return [c for c in range(GRID * GRID) if cells["cell_present"][c] == 1
                and (colour is None or cells["cell_colour"][c] == COLOUR_NAMES.index(colour))
                and (shape is None or cells["cell_shape"][c] == SHAPES.index(shape))]

    if text.startswith("What colour is the ") and len(words) > 4 and words[4] in SHAPES:
        return place() or match(shape=words[4])
    if text.startswith("What shape is at the "):
        return place()
    if text.startswith("Is the ") and "small or large" in text and len(words) > 3 \
            and words[2] in COLOUR_NAMES and words[3] in SHAPES:
        return place() or match(colour=words[2], shape=words[3])
    if text.startswith("Is there a ") and len(words) > 4 and words[3] in COLOUR_NAMES and words[4] in SHAPES:
        return match(colour=words[3], shape=words[4])
    return []
