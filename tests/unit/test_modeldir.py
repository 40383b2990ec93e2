import json

from shared.modeldir import eos_token, read_json, token_str


def test_eos_token_plain_dict_and_missing(tmp_path):
    assert eos_token(tmp_path) is None  # no tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert eos_token(tmp_path) == "<|im_end|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>", "lstrip": False}}))
    assert eos_token(tmp_path) == "</s>"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    assert eos_token(tmp_path) is None and read_json(tmp_path / "tokenizer_config.json") == {}


def test_token_str_ignores_non_strings():
    assert token_str(None) is None and token_str(7) is None and token_str({"content": "x"}) == "x"
