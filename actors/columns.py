"""The row contract between the data plane and the trainer: column names, dtypes and shapes.

One preprocessed row is one example, tokenised and with its image-token run already expanded:

    id, task, subtask          str
    input_ids                  int32 [T]
    labels                     int32 [T]   = input_ids on response tokens, -100 elsewhere (unshifted)
    attention_mask             int8  [T]   all ones (padding is added per batch by the collate)
    response_mask              bool  [T]   token t is a response (assistant) token
    instruction_mask           bool  [T]   token t is a prompt text token (system / user, not image)
    visual_mask                bool  [T]   token t is an image token
    pixel_values               float32 [C, H, W]  the student's image preprocessing

A preference row (task "preference") instead carries two sequences sharing one image:

    chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels   int32 [T_c] / [T_r]

Teacher annotation adds (positions follow `student.losses.positions`: logits at t predict t+1):

    teacher_positions          int32 [P]     the rows the teacher scored, in x[mask] order
    teacher_topk_ids           int32 [P, k]
    teacher_topk_logprobs      float16 [P, k]
    teacher_tail_logmass       float32 [P]   log of the mass outside the top-k
    teacher_relation           float32 [Nv, Nv]   y_v y_v^T over the image tokens (RDist)
    teacher_chosen_logp        float32            summed log-probs of the chosen response (DPO ref)
    teacher_rejected_logp      float32
    teacher_model_id, teacher_tokenizer_hash   str   who annotated the row (cache key / wrong-teacher check)
"""
from __future__ import annotations

IGNORE_INDEX = -100

ID = "id"
TASK = "task"
SUBTASK = "subtask"
INPUT_IDS = "input_ids"
LABELS = "labels"
ATTENTION_MASK = "attention_mask"
RESPONSE_MASK = "response_mask"
INSTRUCTION_MASK = "instruction_mask"
VISUAL_MASK = "visual_mask"
PIXEL_VALUES = "pixel_values"

CHOSEN_INPUT_IDS = "chosen_input_ids"
CHOSEN_LABELS = "chosen_labels"
REJECTED_INPUT_IDS = "rejected_input_ids"
REJECTED_LABELS = "rejected_labels"

TEACHER_POSITIONS = "teacher_positions"
TEACHER_TOPK_IDS = "teacher_topk_ids"
TEACHER_TOPK_LOGPROBS = "teacher_topk_logprobs"
TEACHER_TAIL_LOGMASS = "teacher_tail_logmass"
TEACHER_RELATION = "teacher_relation"
TEACHER_CHOSEN_LOGP = "teacher_chosen_logp"
TEACHER_REJECTED_LOGP = "teacher_rejected_logp"
TEACHER_MODEL_ID = "teacher_model_id"
TEACHER_TOKENIZER_HASH = "teacher_tokenizer_hash"

# token-level [T] columns the collate pads, and the value it pads them with (None: the tokenizer's pad id)
SEQUENCE_COLUMNS: dict[str, int | None] = {
    INPUT_IDS: None,
    LABELS: IGNORE_INDEX,
    ATTENTION_MASK: 0,
    RESPONSE_MASK: 0,
    INSTRUCTION_MASK: 0,
    VISUAL_MASK: 0,
}
PREFERENCE_COLUMNS: dict[str, int | None] = {
    CHOSEN_INPUT_IDS: None,
    CHOSEN_LABELS: IGNORE_INDEX,
    REJECTED_INPUT_IDS: None,
    REJECTED_LABELS: IGNORE_INDEX,
}
