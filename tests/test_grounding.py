"""The embedded teacher's grounding loss: its targets (which cell an answer word is about) and the loss."""
import numpy as np
import pytest
import torch

from actors.shapes.grounding import grounding_targets, patch_cells, token_words
from actors.shapes.tasks import parse_mentions
from actors.shapes.vocab import POSITIONS
from student.losses import grounding_loss

IGNORE = -100


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _row(tok, prompt: str, answer: str, image: bool = True):
    """[36 image tokens] prompt answer <|end|>, labels on the answer and its end token only."""
    head = ([tok.image_token_id] * 36 if image else []) + _ids(tok, prompt)
    ans = _ids(tok, answer) + [tok.convert_tokens_to_ids("<|end|>")]
    return head + ans, [IGNORE] * len(head) + ans, len(head)


def _batch(rows):
    width = max(len(i) for i, _, _ in rows)
    ids = np.zeros((len(rows), width), np.int64)
    labels = np.full((len(rows), width), IGNORE, np.int64)
    for b, (i, l, _) in enumerate(rows):
        ids[b, :len(i)], labels[b, :len(l)] = i, l
    return ids, labels


def test_patch_cells_follow_the_grid():
    assert patch_cells(6).reshape(6, 6)[::2, ::2].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert patch_cells(3).tolist() == list(range(9))
    with pytest.raises(ValueError, match="multiple of the 3x3 grid"):
        patch_cells(4)


def test_targets_of_a_place_answer_and_of_caption_phrases(shapes_tokenizer):
    tok = shapes_tokenizer
    words = token_words(tok)
    where = _row(tok, "Where is the red circle?", "bottom right")
    caption = _row(tok, "Describe the image.", "There are two objects: a small red circle at the top left "
                                               "and a large blue square at the bottom.")
    center = _row(tok, "Where is the red circle?", "center")
    no_image = _row(tok, "Where is the red circle?", "bottom right", image=False)
    other = _row(tok, "What colour is the circle?", "red")
    ids, labels = _batch([where, caption, center, no_image, other])
    rows, queries, cells = grounding_targets(ids, labels, words, tok.image_token_id, 6)
    got = {}
    for r, q, c in zip(rows.tolist(), queries.tolist(), cells.tolist()):
        got.setdefault(r, []).append((words[labels[r, q + 1]], c))  # the word that position q predicts
    assert got[0] == [("bottom", 8), ("right", 8)]
    assert got[1] == [("small", 0), ("red", 0), ("circle", 0), ("top", 0), ("left", 0),
                      ("large", 7), ("blue", 7), ("square", 7), ("bottom", 7)]
    assert got[2] == [("center", 4)]
    assert set(got) == {0, 1, 2}  # no image: nothing to attend to; a colour answer names no place
    assert queries[rows == 0].tolist() == [where[2] - 1, where[2]]


def test_targets_of_the_worlds_chats_point_at_the_named_objects(shapes_world):
    """On the world's own chats: one target per word of a place answer and per grounded word of a
    caption phrase (parsed back with `parse_mentions`), each an occupied cell of that image."""
    import pyarrow.parquet as pq

    from actors.preprocess import image_seq_length_of, preprocess_record
    from actors.recipe import SourceSpec
    from actors.shapes.tokenizer import load_tokenizer
    from actors.sources import load_source
    from student.model import build_processor

    tok = load_tokenizer(shapes_world / "tokenizer")
    proc = build_processor(tok)
    table = load_source(SourceSpec(name="t", format="shapes", path=str(shapes_world), split="train", tasks=("chat",)))
    recs = table.to_pylist()[:40]
    labels_of = {r["id"]: r for r in pq.read_table(shapes_world / "train").to_pylist()}
    pre = [preprocess_record(r, proc, image_seq_length=image_seq_length_of(proc), max_length=1024, preference=False)
           for r in recs]
    ids, labels = _batch([(p["input_ids"].tolist(), p["labels"].tolist(), 0) for p in pre])
    words = token_words(tok)
    rows, queries, cells = grounding_targets(ids, labels, words, tok.image_token_id, 6)
    expected = 0  # a place answer grounds each of its words; a caption phrase its 3 attributes and place words
    for rec in recs:
        for m in rec["messages"]:
            if m["role"] == "assistant" and m["content"] in POSITIONS:
                expected += len(m["content"].split())
            elif m["role"] == "assistant":
                expected += sum(3 + len(o.position.split()) for o in parse_mentions(m["content"]))
    assert len(rows) == expected > 40
    for r, q, c in zip(rows.tolist(), queries.tolist(), cells.tolist()):
        scene = labels_of[recs[r]["id"]]
        assert scene["cell_present"][c] == 1, (recs[r]["id"], words[labels[r, q + 1]], c)


def test_token_words_refuses_a_tokenizer_that_splits_a_world_word():
    class Table:  # the two calls token_words makes of a tokenizer
        vocab = ["<pad>", "Ġred", "Ġcir", "cle"]

        def __len__(self):
            return len(self.vocab)

        def convert_ids_to_tokens(self, ids):
            return [self.vocab[i] for i in ids]

    with pytest.raises(ValueError, match="one token.*'blue'"):
        token_words(Table())


def _reference(attentions, rows, queries, targets, head):
    out = []
    for attn in attentions:
        for r, q, t in zip(rows.tolist(), queries.tolist(), targets):
            mass = sum(float(attn[r, head, q, k].detach()) for k in range(len(t)) if t[k])
            out.append(-np.log(mass + 1e-6))
    return float(np.mean(out))


def test_grounding_loss_matches_a_reference_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 2, 10, 10, generator=g, requires_grad=True) for _ in range(2)]
    attentions = [x.softmax(-1) for x in logits]
    rows, queries = torch.tensor([0, 2, 2, 1]), torch.tensor([9, 4, 5, 0])
    targets = torch.rand(4, 10, generator=g) < 0.3
    targets[:, 3] = True
    for head in (0, 1):
        loss = grounding_loss(attentions, rows, queries, targets, head=head)
        assert loss.item() == pytest.approx(_reference(attentions, rows, queries, targets, head), rel=1e-5)
    loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in logits)
    perfect = torch.zeros(1, 1, 4, 4)
    perfect[0, 0, 3, 1] = 1.0
    assert grounding_loss([perfect], torch.tensor([0]), torch.tensor([3]),
                          torch.tensor([[False, True, False, False]])).item() == pytest.approx(0.0, abs=1e-5)


def test_grounding_loss_edge_cases():
    attn = [torch.full((1, 1, 4, 4), 0.25)]
    empty = grounding_loss(attn, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                           torch.zeros(0, 4, dtype=torch.bool))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="same N queries"):
        grounding_loss(attn, torch.tensor([0, 0]), torch.tensor([1]), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one target key"):
        grounding_loss(attn, torch.tensor([0]), torch.tensor([1]), torch.zeros(1, 4, dtype=torch.bool))


def test_the_teacher_step_with_grounding_sharpens_the_lookup(shapes_world):
    """stage_step's ground term on a tiny teacher: logged, and it falls in a few steps on one batch;
    without eager attention it is a clear error, not a silent zero."""
    from actors.collate import pad_collate
    from actors.preprocess import image_seq_length_of, preprocess_record
    from actors.recipe import LossSpec, SourceSpec
    from actors.shapes.tokenizer import load_tokenizer
    from actors.sources import load_source
    from student.model import build_processor, build_teacher, get_preset
    from student.training.step import StepContext, stage_step

    tok = load_tokenizer(shapes_world / "tokenizer")
    proc = build_processor(tok)
    table = load_source(SourceSpec(name="t", format="shapes", path=str(shapes_world), split="train", tasks=("chat",)))
    rows = [preprocess_record(r, proc, image_seq_length=image_seq_length_of(proc), max_length=1024, preference=False)
            for r in table.to_pylist()[:8]]
    batch = pad_collate({k: [r[k] for r in rows] for k in rows[0]}, tok.pad_token_id)
    torch.manual_seed(0)
    model = build_teacher(get_preset("tiny"), tok, seed=1)
    ctx = StepContext(vocab_size=len(tok), image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id,
                      ground_words=tuple(token_words(tok)), patches_per_side=6)
    spec = LossSpec(ce=1.0, ground=0.5)
    with pytest.raises(ValueError, match="eager"):
        stage_step(model, batch, "teacher", spec, ctx)
    with pytest.raises(ValueError, match="ground_words"):
        model.set_attn_implementation("eager")
        stage_step(model, batch, "teacher", spec, StepContext(vocab_size=len(tok), image_token_id=tok.image_token_id,
                                                              pad_token_id=tok.pad_token_id))
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    seen = []
    for _ in range(12):
        total, logged = stage_step(model, batch, "teacher", spec, ctx)
        assert total.item() == pytest.approx(logged["loss/ce"] + 0.5 * logged["loss/ground"], rel=1e-5)
        seen.append(logged["loss/ground"])
        opt.zero_grad()
        total.backward()
        opt.step()
    assert seen[-1] < 0.5 * seen[0], seen


def test_question_cells_name_the_objects_a_question_is_about():
    from actors.shapes.grounding import question_cells
    from actors.shapes.world import Obj, Scene, cell_labels

    scene = Scene(objects=(Obj("circle", "red", "small", 0), Obj("circle", "blue", "small", 4),
                           Obj("square", "blue", "large", 8)), offsets=((0, 0),) * 3)
    cells = cell_labels(scene)
    asked = {
        "What colour is the square?": [8],
        "What colour is the circle at the top left?": [0],
        "What shape is at the bottom right?": [8],
        "Is the red circle small or large?": [0],
        "Is the blue circle at the center small or large?": [4],
        "Is there a blue circle in the image?": [4],
        "Is there a red square in the image?": [],  # the answer is no: nothing to point at
        "How many objects are there?": [],
        "Where is the red circle?": [],  # grounded from its answer's words instead
    }
    assert {q: question_cells(q, cells) for q in asked} == asked
