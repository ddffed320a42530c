"""Text tasks over a scene: captions, VQA, POPE-style probes and preference pairs.

Every text is generated from the scene's ground truth, so answers are exact and captions can be
parsed back into objects (which is how hallucination is measured).
"""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from actors.shapes.vocab import COLOUR_NAMES, POSITIONS, SHAPES, SIZES
from actors.shapes.world import Obj, Scene, WorldConfig, combo_prior, sample_scene

CAPTION_PROMPT = "Describe the image."
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
POPE_KINDS = ("random", "popular", "adversarial")
VQA_KINDS = ("colour", "shape", "count", "position", "size")
REJECT_KINDS = ("object", "colour", "shape", "size", "position")
CHAT_TURNS = 6  # turns per training chat (`chat_records`)

_MENTION = re.compile(
    r"\b(small|large) (" + "|".join(COLOUR_NAMES) + r") (" + "|".join(SHAPES) + r") at the ("
    + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")\b"
)


def caption(objects: tuple[Obj, ...] | list[Obj]) -> str:
    objs = sorted(objects, key=lambda o: o.cell)
    phrases = [o.phrase() for o in objs]
    if len(phrases) == 1:
        return f"There is one object: {phrases[0]}."
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"There are {NUMBER_WORDS[len(phrases)]} objects: {listed}."


def parse_mentions(text: str) -> list[Obj]:
    """Objects a caption mentions, in order; the inverse of `caption` and robust to extra words."""
    return [
        Obj(shape=m[2], colour=m[1], size=m[0], cell=POSITIONS.index(m[3]))
        for m in _MENTION.findall(text)
    ]


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": "<image>" + question},
        {"role": "assistant", "content": answer},
    ]


def _unique(scene: Scene, key) -> list[Obj]:
    counts: dict = {}
    for o in scene.objects:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return [o for o in scene.objects if counts[key(o)] == 1]


def vqa(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """One question of `kind` with its short answer; objects are always named unambiguously."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if kind == "colour":
        if obj in _unique(scene, lambda o: o.shape):
            return f"What colour is the {obj.shape}?", obj.colour
        return f"What colour is the {obj.shape} at the {obj.position}?", obj.colour
    if kind == "shape":
        return f"What shape is at the {obj.position}?", obj.shape
    if kind == "count":
        if rng.random() < 0.5:
            return "How many objects are there?", NUMBER_WORDS[len(scene.objects)]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        n = sum(o.colour == colour for o in scene.objects)
        return f"How many {colour} objects are there?", NUMBER_WORDS[n]
    if kind in ("position", "size"):
        named = _unique(scene, lambda o: o.kind)
        obj = named[int(rng.integers(len(named)))] if named else obj
        name = f"{obj.colour} {obj.shape}" if named else f"{obj.colour} {obj.shape} at the {obj.position}"
        if kind == "position":
            return f"Where is the {name}?", obj.position
        return f"Is the {name} small or large?", obj.size
    raise ValueError(f"unknown VQA kind {kind!r}; expected one of {VQA_KINDS}")


def pope_question(colour: str, shape: str) -> str:
    return f"Is there a {colour} {shape} in the image?"


def pope_negative(scene: Scene, kind: str, rng: np.random.Generator, prior: dict) -> tuple[str, str]:
    """An absent (colour, shape): random, among the most popular, or sharing an attribute with a present one."""
    present = {o.kind for o in scene.objects}
    absent = [cs for cs in prior if cs not in present]
    if kind == "random":
        pool = absent
    elif kind == "popular":
        pool = sorted(absent, key=lambda cs: -prior[cs])[:3]
    elif kind == "adversarial":
        colours = {o.colour for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        pool = [cs for cs in absent if cs[0] in colours or cs[1] in shapes]
    else:
        raise ValueError(f"unknown POPE kind {kind!r}; expected one of {POPE_KINDS}")
    return pool[int(rng.integers(len(pool)))]


def hallucinated_object(scene: Scene, rng: np.random.Generator) -> Obj:
    """An object in an empty cell: the kind of thing a noisy web caption invents."""
    empty = [c for c in range(len(POSITIONS)) if scene.at(c) is None]
    return Obj(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        colour=COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))],
        size=SIZES[int(rng.integers(len(SIZES)))],
        cell=empty[int(rng.integers(len(empty)))],
    )


def corrupt(scene: Scene, kind: str, rng: np.random.Generator) -> list[Obj]:
    """The scene's objects with exactly one hallucination: an added object or one wrong attribute."""
    objs = list(scene.objects)
    if kind == "object":
        return objs + [hallucinated_object(scene, rng)]
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if kind == "position":
        empty = [c for c in range(len(POSITIONS)) if scene.at(c) is None]
        objs[i] = replace(o, cell=empty[int(rng.integers(len(empty)))])
        return objs
    field, values = {"colour": ("colour", COLOUR_NAMES), "shape": ("shape", SHAPES), "size": ("size", SIZES)}[kind]
    others = [v for v in values if v != getattr(o, field)]
    objs[i] = replace(o, **{field: others[int(rng.integers(len(others)))]})
    return objs


def scene_records(
    scene: Scene, rng: np.random.Generator, *, train: bool, noisy_rate: float, prior: dict, pope_kind: str,
    chat: bool | None = None, chat_turns: int = CHAT_TURNS,
) -> list[dict]:
    """All text records of one image. Only training captions may be noisy; training images also get
    multi-turn `chat_records` of at most `chat_turns` turns (chat=None means: when train)."""
    recs: list[dict] = []
    cap_objs = list(scene.objects)
    noisy = train and rng.random() < noisy_rate
    if noisy:
        cap_objs.append(hallucinated_object(scene, rng))
    recs.append(dict(task="caption", subtask="noisy" if noisy else "clean", noisy=noisy,
                     messages=_turns(CAPTION_PROMPT, caption(cap_objs)), answer=caption(cap_objs)))
    for kind in VQA_KINDS:
        q, a = vqa(scene, kind, rng)
        recs.append(dict(task="vqa", subtask=kind, noisy=False, messages=_turns(q, a), answer=a))
    pos = scene.objects[int(rng.integers(len(scene.objects)))]
    neg = pope_negative(scene, pope_kind, rng, prior)
    probes = [(pope_question(pos.colour, pos.shape), "yes"), (pope_question(*neg), "no")]
    for q, a in probes:
        recs.append(dict(task="pope", subtask=pope_kind, noisy=False, messages=_turns(q, a), answer=a))
    reject_kind = REJECT_KINDS[int(rng.integers(len(REJECT_KINDS)))]
    chosen = caption(scene.objects)
    recs.append(dict(task="preference", subtask=reject_kind, noisy=False,
                     messages=[{"role": "user", "content": "<image>" + CAPTION_PROMPT}],
                     answer=chosen, chosen=chosen, rejected=caption(corrupt(scene, reject_kind, rng))))
    if train if chat is None else chat:  # drawn last, so the single-turn records above do not depend on it
        recs.extend(chat_records(recs, scene, rng, chat_turns))
    return recs


def dense_questions(scene: Scene) -> list[tuple[str, str]]:
    """Every object asked about by position and by name: the binding drills of the teacher's chat.

    Question-conditioned retrieval ("where is the red circle?", "what shape is at the left?") is what a
    small LM learns last; one image's conversation asks it for every object, at a few tokens each.
    """
    named = set(_unique(scene, lambda o: o.kind))
    by_shape = set(_unique(scene, lambda o: o.shape))
    out = []
    for o in scene.objects:
        out.append((f"What shape is at the {o.position}?", o.shape))
        name = f"{o.colour} {o.shape}" if o in named else f"{o.colour} {o.shape} at the {o.position}"
        if o in named:
            out.append((f"Where is the {name}?", o.position))
        out.append((f"Is the {name} small or large?", o.size))
        if o in by_shape:
            out.append((f"What colour is the {o.shape}?", o.colour))
    return out


def chat_records(recs: list[dict], scene: Scene, rng: np.random.Generator, turns: int = CHAT_TURNS) -> list[dict]:
    """The image's questions as short multi-turn conversations: its caption, VQA and probes plus
    `dense_questions`, each asked once, shuffled, cut into chats of at most `turns` turns (sizes differ
    by at most one), the image in the first turn of each (as in LLaVA's multi-turn instruction data).

    The chats are the world's instruction data, curated like LLaVA-Instruct: their caption is always
    the true one. Noise lives in the single-turn caption records (web-style pretraining captions).
    Trained on chats whose caption was noisy 15% of the time, the teacher's caption exact match was
    ~15 points lower at 600 steps (docs/training.md).

    Many answers per pass over the 36 image tokens is what made question-conditioned tasks learnable
    within the demo's budget (POPE 50% -> 99% in the same compute); cutting one 25-turn chat per image
    into chats of 6 lifted the teacher's held-out VQA and POPE from ~77% to ~90% at equal tokens
    (docs/training.md): a short context leaves an answer's attention fewer tokens to spread over, and
    fewer earlier turns to copy an answer from instead of reading the image.
    """
    if turns < 1:
        raise ValueError(f"chat turns must be >= 1, got {turns}")
    pairs = [(CAPTION_PROMPT, caption(scene.objects))]  # curated: never the noisy web-style caption
    pairs += [(r["messages"][0]["content"].replace("<image>", ""), r["messages"][1]["content"])
              for r in recs if r["task"] in ("vqa", "pope")]
    asked: set[str] = set()
    unique = []
    for q, a in pairs + dense_questions(scene):  # a VQA question is often a drill too: ask it once
        if q not in asked:
            asked.add(q)
            unique.append((q, a))
    chats = []
    for part in np.array_split(rng.permutation(len(unique)), -(-len(unique) // turns)):
        messages: list[dict[str, str]] = []
        for n, (q, a) in enumerate(unique[int(i)] for i in part):
            messages += [{"role": "user", "content": ("<image>" if n == 0 else "") + q},
                         {"role": "assistant", "content": a}]
        chats.append(dict(task="chat", subtask="clean", noisy=False, messages=messages, answer=None))
    return chats


def corpus_text(seed: int, num_scenes: int) -> list[str]:
    """Plain text of many scenes' records plus every vocabulary word: the tokenizer's training corpus."""
    cfg = WorldConfig()
    prior = combo_prior(cfg.popularity_skew)
    rng = np.random.default_rng(seed)
    texts = [" ".join(COLOUR_NAMES + SHAPES + SIZES + POSITIONS + NUMBER_WORDS + ("yes", "no"))]
    for i in range(num_scenes):
        scene = sample_scene(rng, cfg)
        for r in scene_records(scene, rng, train=True, noisy_rate=0.15, prior=prior,
                               pope_kind=POPE_KINDS[i % 3], chat=False):
            texts.extend(m["content"].replace("<image>", "") for m in r["messages"])
            if r.get("rejected"):
                texts.append(r["rejected"])
    return texts
