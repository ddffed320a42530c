"""Teacher/student tokenizer compatibility, and explicit handling of padded vocabularies.

Distillation compares distributions over token ids, so the two tokenizers must agree on every id the
data uses and on the special and image tokens; a disagreement is an error that names the first
mismatches, not a warning. A model whose embedding has more rows than its tokenizer has tokens
(Qwen: 151936 or 152064 rows for ~151.6k tokens) gets its extra logits masked to -inf; slicing them
off silently would hide a teacher/student vocab disagreement and break log-prob normalisation checks.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TokenizerMismatchError", "Mismatch", "find_mismatches", "check_tokenizers", "vocab_mask", "mask_padded_logits"]

_SPECIAL_ATTRS = ("pad_token", "eos_token", "bos_token", "unk_token", "image_token")


class TokenizerMismatchError(ValueError):
    def __init__(self, mismatches: Sequence["Mismatch"], shown: int = 10):
        self.mismatches = list(mismatches)
        n = len(self.mismatches)
        lines = [f"teacher and student tokenizers disagree ({n} mismatch{'es' if n != 1 else ''}; first {min(shown, n)}):"]
        lines += [f"  - {m}" for m in self.mismatches[:shown]]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Mismatch:
    kind: str  # "special" | "token" | "text"
    detail: str  # a complete sentence naming both sides

    def __str__(self) -> str:
        return self.detail


def _tok_id(tok, token: str | None) -> int | None:
    if token is None:
        return None
    return tok.get_vocab().get(token)


def _special(tok, attr: str) -> tuple[str | None, int | None]:
    token = getattr(tok, attr, None)
    return (None, None) if token is None else (str(token), _tok_id(tok, str(token)))


def _added_vocab(tok) -> dict[str, int]:
    return dict(tok.get_added_vocab()) if hasattr(tok, "get_added_vocab") else {}


def find_mismatches(teacher_tok, student_tok, texts: Iterable[str] | None = None) -> list[Mismatch]:
    """All disagreements, most important first: special tokens, then token ids, then text encodings.

    With `texts`, only the tokens those texts use are compared (plus the special ones); without, every
    student token must have the same id in the teacher (the teacher may have extra tokens).
    """
    out: list[Mismatch] = []
    for attr in _SPECIAL_ATTRS:
        t, s = _special(teacher_tok, attr), _special(student_tok, attr)
        if t != s:
            out.append(Mismatch("special", f"special token {attr}: teacher {t[0]!r} (id {t[1]}) vs student {s[0]!r} (id {s[1]})"))

    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    t_added, s_added = _added_vocab(teacher_tok), _added_vocab(student_tok)
    for token in sorted(set(t_added) | set(s_added), key=lambda x: (t_added.get(x, s_added.get(x, -1)), x)):
        if t_vocab.get(token) != s_vocab.get(token):
            out.append(Mismatch("special", f"special token {token!r}: teacher id {t_vocab.get(token)} vs student id {s_vocab.get(token)}"))

    if texts is None:
        used = sorted(s_vocab, key=s_vocab.get)
    else:
        used_ids: dict[str, None] = {}
        for i, text in enumerate(texts):
            t_ids = teacher_tok.encode(text, add_special_tokens=False)
            s_ids = student_tok.encode(text, add_special_tokens=False)
            if t_ids != s_ids:
                p = next((j for j, (a, b) in enumerate(zip(t_ids, s_ids)) if a != b), min(len(t_ids), len(s_ids)))
                ta = teacher_tok.convert_ids_to_tokens(t_ids[p : p + 3])
                sa = student_tok.convert_ids_to_tokens(s_ids[p : p + 3])
                out.append(
                    Mismatch("text", f"text {i} ({text[:40]!r}) differs at token {p}: teacher {ta} {t_ids[p:p + 3]} vs student {sa} {s_ids[p:p + 3]}")
                )
            for tid in t_ids:
                used_ids.setdefault(teacher_tok.convert_ids_to_tokens(tid))
            for sid in s_ids:
                used_ids.setdefault(student_tok.convert_ids_to_tokens(sid))
        used = list(used_ids)
    for token in used:
        if t_vocab.get(token) != s_vocab.get(token):
            out.append(Mismatch("token", f"token {token!r}: teacher id {t_vocab.get(token)} vs student id {s_vocab.get(token)}"))
    return out


def check_tokenizers(teacher_tok, student_tok, texts: Iterable[str] | None = None, shown: int = 10) -> None:
    """Raise TokenizerMismatchError listing the first `shown` mismatches; return None when compatible."""
    mismatches = find_mismatches(teacher_tok, student_tok, texts)
    if mismatches:
        raise TokenizerMismatchError(mismatches, shown)


def vocab_mask(model_vocab: int, tokenizer_vocab: int, device: torch.device | str | None = None) -> Tensor:
    """bool [model_vocab]: True for ids the tokenizer can produce."""
    if tokenizer_vocab > model_vocab:
        raise ValueError(
            f"tokenizer has {tokenizer_vocab} tokens but the model only {model_vocab} logits: resize the embeddings"
        )
    return torch.arange(model_vocab, device=device) < tokenizer_vocab


def mask_padded_logits(logits: Tensor, vocab_size: int) -> Tensor:
    """Logits [..., V_model] with ids >= vocab_size (the tokenizer's length) set to -inf; shape unchanged."""
    v = logits.shape[-1]
    if vocab_size > v:
        raise ValueError(f"vocab_size {vocab_size} exceeds the logits' last dim {v}")
    if vocab_size == v:
        return logits
    return logits.masked_fill(~vocab_mask(v, vocab_size, logits.device), float("-inf"))
