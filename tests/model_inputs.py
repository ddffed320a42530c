"""Small image+text inputs shared by the model tests."""
import numpy as np
from PIL import Image

from student.model import build_processor

PROMPT = "<image>What colour is the circle?"
ANSWERS = ("red", "a large blue square at the top left")


def random_images(n: int = 2) -> list[Image.Image]:
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (48, 48, 3), dtype=np.uint8)) for i in range(n)]


def prompt_texts(tok, answers=ANSWERS) -> list[str]:
    head = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return [head + a for a in answers]


def image_text_batch(tok, answers=ANSWERS):
    """Processor output (input_ids with 36 image tokens each, pixel_values, attention_mask), right-padded."""
    return build_processor(tok)(images=random_images(len(answers)), text=prompt_texts(tok, answers),
                                return_tensors="pt", padding=True)
