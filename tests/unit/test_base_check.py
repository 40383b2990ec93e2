import json

import pytest

from eval.base_check import check, main

# The real files of Qwen2.5-32B (base) and Qwen2.5-32B-Instruct, trimmed to the fields the check reads.
QWEN_TEMPLATE = "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}"
MODELS = {
    "Qwen2.5-32B": (
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
        {"eos_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE},
        {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048},
        "BASE",
    ),
    "Qwen2.5-32B-Instruct": (
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
        {"eos_token": "<|im_end|>", "chat_template": QWEN_TEMPLATE},
        {"do_sample": True, "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
         "top_p": 0.8, "top_k": 20},
        "INSTRUCT",
    ),
    "Llama-3.1-8B": (
        {"architectures": ["LlamaForCausalLM"]},
        {"eos_token": "<|end_of_text|>"},
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 128001},
        "BASE",
    ),
    "mystery-model": ({"architectures": ["LlamaForCausalLM"]}, {"eos_token": "<|im_end|>"}, {}, "UNSURE"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_verdicts_from_real_model_files(tmp_path, name, capsys):
    config, tok, gen, expected = MODELS[name]
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    (d / "generation_config.json").write_text(json.dumps(gen))
    v, ev = check(d)
    assert v == expected, [e.reason for e in ev]
    assert main([str(d)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"verdict: {expected}" and len(out) == len(ev) + 1


def test_not_a_model_dir(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_a_dead_server_is_one_line(tmp_path, capsys):
    from eval.base_check import main
    from gen_server.process import free_port

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert main([str(tmp_path), "--server", f"http://127.0.0.1:{free_port()}"]) == 3
    err = capsys.readouterr().err
    assert "no healthy generation server" in err and "Traceback" not in err
