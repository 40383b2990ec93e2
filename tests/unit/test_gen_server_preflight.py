"""Checked before a model loads: a model dir that cannot load is one line naming the problem (from gen_server and
the pipeline), and a bind other machines can reach needs an API key."""

import json
import shutil

import pytest

from gen_server.__main__ import main as gen_server_main
from gen_server.models import check_model_dir
from pipeline.validate import validate_pipeline
from shared.config import ConfigError, load_config


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _broken(tiny_model_dir, tmp_path, kind):
    d = _copy(tiny_model_dir, tmp_path / kind)
    if kind == "config":
        (d / "config.json").write_text("{broken")
    elif kind == "weights":
        for f in d.glob("*.safetensors"):
            f.unlink()
    elif kind == "tokenizer":
        for f in d.glob("tokenizer*"):
            f.unlink()
    elif kind == "shard":
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return d


CASES = {"config": "is not valid JSON", "weights": "has no weights", "tokenizer": "has no tokenizer files",
         "shard": "1 weight shard(s) named in model.safetensors.index.json are missing"}


def test_a_good_dir_passes(tiny_model_dir):
    assert check_model_dir(tiny_model_dir) == []
    assert check_model_dir(tiny_model_dir, max_model_len=2048) == []
    assert "exceeds the model's 2048 positions" in check_model_dir(tiny_model_dir, max_model_len=4096)[0]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_broken_dirs_are_one_line_each(tiny_model_dir, tmp_path, kind, capsys):
    d = _broken(tiny_model_dir, tmp_path, kind)
    [problem] = check_model_dir(d)
    assert CASES[kind] in problem and str(d) in problem
    assert gen_server_main(["--model", str(d), "--port", "18999", "--backend", "embedded"]) == 2
    err = capsys.readouterr().err
    assert CASES[kind] in err and "Traceback" not in err
    with pytest.raises(ConfigError) as e:
        validate_pipeline(load_config(None, [f"model.base={d}"]), d)
    assert "model.base: " in str(e.value) and CASES[kind] in str(e.value)


def test_dummy_weights_need_no_files(tiny_model_dir, tmp_path):
    d = _broken(tiny_model_dir, tmp_path, "weights")
    assert check_model_dir(d, need_weights=False) == []


def test_max_model_len_past_the_model_is_refused_before_loading(tiny_model_dir, capsys):
    assert gen_server_main(["--model", str(tiny_model_dir), "--port", "18999", "--backend", "embedded",
                            "--max-model-len", "999999"]) == 2
    assert "max_model_len=999999 exceeds the model's 2048 positions" in capsys.readouterr().err


@pytest.mark.parametrize("host,key,insecure,refused", [
    ("0.0.0.0", None, False, True), ("10.1.2.3", None, False, True), ("myhost.example", None, False, True),
    ("0.0.0.0", "k", False, False), ("0.0.0.0", None, True, False),
    ("127.0.0.1", None, False, False), ("localhost", None, False, False), ("::1", None, False, False),
])
def test_a_public_bind_needs_a_key_or_allow_insecure(tiny_model_dir, capsys, monkeypatch, host, key, insecure,
                                                     refused):
    from gen_server.__main__ import _validate, build_parser

    monkeypatch.delenv("GEN_SERVER_API_KEY", raising=False)
    argv = ["--model", str(tiny_model_dir), "--host", host, *(["--api-key", key] if key else []),
            *(["--allow-insecure"] if insecure else [])]
    problems = _validate(build_parser().parse_args(argv), [])
    assert bool(problems) is refused
    if refused:
        assert "Set GEN_SERVER_API_KEY (or --api-key), or pass --allow-insecure" in problems[0]
        with pytest.raises(SystemExit) as e:
            gen_server_main([*argv, "--port", "18999"])
        assert e.value.code == 2 and "allow-insecure" in capsys.readouterr().err
