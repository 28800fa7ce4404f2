from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_dir_loads_and_renders_chat(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True
    )
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert model.config.vocab_size == len(tok)
    assert "What is 2 + 3?" in tok.decode(ids)
