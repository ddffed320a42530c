from actors.shapes.tokenizer import END_OF_TURN, IMAGE, ROLE_TOKENS, build_tokenizer, load_tokenizer, save_tokenizer


def test_round_trip_and_special_tokens(tmp_path, shapes_tokenizer):
    tok = shapes_tokenizer
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "<image>What colour is the circle?"},
            {"role": "assistant", "content": "red"}]
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert again.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"] == ids
    assert ids.count(tok.image_token_id) == 1 and again.image_token_id == tok.image_token_id
    assert tok.convert_ids_to_tokens(ids)[0] == ROLE_TOKENS["user"]
    assert tok.eos_token == END_OF_TURN and tok.pad_token_id != tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "What colour is the circle?red"
    assert IMAGE in tok.all_special_tokens


def test_world_words_are_single_tokens(shapes_tokenizer):
    for word in ("circle", "triangle", "purple", "orange", "left", "large"):
        assert len(shapes_tokenizer(" " + word)["input_ids"]) == 1, word


def test_list_content_renders_like_string_content(shapes_tokenizer):
    a = [{"role": "user", "content": "<image>Describe the image."}]
    b = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    render = lambda m: shapes_tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
    assert render(a) == render(b) == "<|user|><image>Describe the image.<|end|><|assistant|>"


def test_deterministic():
    assert build_tokenizer().get_vocab() == build_tokenizer().get_vocab()
