"""Byte-level BPE tokenizer for the shapes world, saved in Hugging Face format.

Teacher and student share it, so distillation compares distributions over the same ids.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD = "<pad>"
END_OF_TURN = "<|end|>"
IMAGE = "<image>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, END_OF_TURN, IMAGE, *ROLE_TOKENS.values()]

# One turn = role marker, content, end-of-turn. Content is a string (with "<image>" where the image
# goes) or the HF multimodal list form [{"type": "image"}, {"type": "text", "text": ...}].
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "<|{{ m['role'] }}|>"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}<image>{%- else -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def default_corpus() -> list[str]:
    """A fixed sample of the world's text, so the tokenizer does not depend on any run's seed."""
    from actors.shapes.tasks import corpus_text  # local import: tasks imports nothing from here

    return corpus_text(seed=20240830, num_scenes=600)


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """Train the world's BPE tokenizer; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(default_corpus() if corpus is None else corpus)
    if not texts:
        raise ValueError("build_tokenizer: the corpus is empty")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=END_OF_TURN,
        extra_special_tokens={"image_token": IMAGE},
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
