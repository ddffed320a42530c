"""Export/reload identity, parameter report by hand, and loading real local checkpoints."""
import dataclasses
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from actors.shapes.tokenizer import CHAT_TEMPLATE
from student.model import (
    assemble_student,
    build_llava,
    build_processor,
    export,
    get_preset,
    load_model,
    load_teacher,
    parameter_report,
    upcycle,
)
from model_inputs import prompt_texts, random_images


def student(tok, family="qwen3"):
    p = get_preset("tiny")
    return build_llava(p.vision, dataclasses.replace(p.student, family=family), tok).eval()


@pytest.mark.parametrize(
    "family,layers", [("qwen3", None), ("qwen3", "every_other"), ("qwen2", "all"), ("qwen2", "every_other")]
)
def test_export_reloads_with_identical_logits_and_layout(tmp_path, shapes_tokenizer, family, layers):
    tok = shapes_tokenizer
    proc = build_processor(tok)
    model = student(tok, family)
    if layers is not None:
        model = upcycle(model, 4, 2, layers=layers, router_std=0.5).eval()
    export(model, proc, tmp_path)

    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    b = proc(images=random_images(), text=prompt_texts(tok), return_tensors="pt", padding=True)
    b2 = proc2(images=random_images(), text=prompt_texts(tok), return_tensors="pt", padding=True)
    assert b.keys() == b2.keys() and all(torch.equal(b[k], b2[k]) for k in b)
    with torch.no_grad():
        assert torch.equal(model(**b).logits, again(**b2).logits)
    assert type(again) is type(model)
    cfg = lambda m: {k: v for k, v in m.config.text_config.to_dict().items() if k != "dtype"}
    assert cfg(again) == cfg(model)
    if layers is not None:
        assert again.config.text_config.mlp_only_layers == model.config.text_config.mlp_only_layers
        assert again.get_experts_implementation()["text_config"] == "grouped_mm"
        kinds = lambda m: [type(layer.mlp).__name__ for layer in m.model.language_model.layers]
        assert kinds(again) == kinds(model)
    assert json.loads((tmp_path / "parameters.json").read_text()) == parameter_report(model)


def test_parameter_report_by_hand(shapes_tokenizer):
    p = get_preset("tiny")
    H, I, L, V = p.student.hidden_size, p.student.intermediate_size, p.student.num_layers, len(shapes_tokenizer)
    dense = student(shapes_tokenizer)
    d = parameter_report(dense)
    assert d["total"] == d["active"] == sum(x.numel() for x in dense.parameters())
    assert d["experts"] == d["routers"] == d["num_experts"] == 0 and d["moe_layers"] == []

    moe = upcycle(dense, 4, 2, layers="every_other")
    r = parameter_report(moe)
    ffn = 3 * H * I  # one expert = the dense SwiGLU FFN
    moe_layers = list(range(0, L, 2))
    assert r["moe_layers"] == moe_layers and (r["num_experts"], r["top_k"]) == (4, 2)
    assert r["experts"] == len(moe_layers) * 4 * ffn
    assert r["experts_active"] == len(moe_layers) * 2 * ffn
    assert r["routers"] == len(moe_layers) * 4 * H
    # each MoE layer swaps one FFN for 4 experts and a router; per token only 2 experts run
    assert r["total"] == d["total"] + len(moe_layers) * (3 * ffn + 4 * H)
    assert r["active"] == d["total"] + len(moe_layers) * (ffn + 4 * H)
    assert r["language_model"] - d["language_model"] == r["total"] - d["total"]
    assert (r["vision"], r["projector"]) == (d["vision"], d["projector"])
    q, kv, hd = p.student.num_heads * p.student.head_dim, p.student.num_kv_heads * p.student.head_dim, p.student.head_dim
    attention = 2 * H * q + 2 * H * kv + 2 * hd  # q, o; k, v (GQA); q_norm and k_norm over head_dim
    assert d["language_model"] == 2 * V * H + H + L * (attention + 2 * H + ffn)  # embeddings, lm_head, final norm


def test_load_teacher_is_frozen_and_loads_moe_on_grouped_mm(tmp_path, shapes_tokenizer):
    model = upcycle(student(shapes_tokenizer), 4, 2)
    export(model, build_processor(shapes_tokenizer), tmp_path)
    teacher, proc = load_teacher(tmp_path)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.get_experts_implementation()["text_config"] == "grouped_mm"
    assert proc.tokenizer.image_token_id == shapes_tokenizer.image_token_id
    assert load_model(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def _plain_tokenizer():
    """An LLM tokenizer with no image token, like a text-only Qwen checkpoint."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<|end|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    t.train_from_iterator(["what colour is the circle? a red circle at the top left"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE)


@pytest.mark.parametrize("checkpoint", ["vision_only", "full_clip"])
def test_assemble_student_from_tower_and_llm_checkpoints(tmp_path, checkpoint):
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(image_size=48, patch_size=8, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=2)
    if checkpoint == "vision_only":
        tower = CLIPVisionModel(vcfg).eval()
        tower.save_pretrained(tmp_path / "vision")
    else:  # a whole CLIP (text tower included): only its vision tower is taken
        text = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        clip = CLIPModel(CLIPConfig(vision_config=vcfg.to_dict(), text_config=text.to_dict(), projection_dim=32)).eval()
        clip.save_pretrained(tmp_path / "vision")
        tower = clip.vision_model
    tok = _plain_tokenizer()
    vocab = -(-(len(tok) + 1) // 64) * 64  # padded, with room for the image token (like Qwen's 151936)
    llm = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                       tie_word_embeddings=True)).eval()
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")

    model, proc = assemble_student(tmp_path / "vision", tmp_path / "llm")
    model.eval()
    assert proc.tokenizer.image_token == "<image>" and model.config.image_token_index == len(tok) < vocab
    assert model.config.vision_feature_layer == -2 and model.config.image_seq_length == 36
    ids = torch.tensor([tok.encode("<|user|>what colour is the circle?")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, llm(input_ids=ids).logits)  # text path = the LLM itself
        b = proc(images=random_images(1), text=["<|user|><image>what colour?"], return_tensors="pt")
        assert (b["input_ids"] == model.config.image_token_index).sum() == 36
        got = model.model.vision_tower(b["pixel_values"], output_hidden_states=True).hidden_states[-2]
        ref = tower(b["pixel_values"], output_hidden_states=True).hidden_states[-2]
        assert torch.equal(got, ref)
        assert model(**b).logits.shape == (1, b["input_ids"].shape[1], vocab)

    moe = upcycle(model, 4, 2).eval()  # a tied LLM stays tied through upcycling
    assert moe.lm_head.weight is moe.model.language_model.embed_tokens.weight
    with torch.no_grad():
        assert (moe(input_ids=ids).logits - llm(input_ids=ids).logits).abs().max() <= 1e-5

    export(model, proc, tmp_path / "student")  # the image token survives a round trip
    again = AutoProcessor.from_pretrained(tmp_path / "student")
    assert again.tokenizer.image_token_id == model.config.image_token_index
