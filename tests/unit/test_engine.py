"""The batching engine on tiny random Llama and Qwen2 models: batching must not change results, and log-probs must
equal a plain full forward pass of the same model."""

from __future__ import annotations

import asyncio
from concurrent.futures import wait

import pytest
import torch

from gen_server.engine import ContextLengthError, Engine, SamplingParams

PROMPTS = ["Write a poem", "The quick brown fox jumps over the lazy dog.", "0", "# Query: List three colors.\n# Answer:"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module", params=["tiny_model_dir", "tiny_chat_model_dir"], ids=["llama", "qwen2"])
def engine(request):
    engine = Engine(request.getfixturevalue(request.param), max_batch_size=8)
    yield engine
    engine.close()


def solo(engine: Engine, prompt, params: SamplingParams):
    return engine.submit(prompt, params).result(timeout=60)


def batched(engine: Engine, prompts, params: SamplingParams, n: int = 1):
    return asyncio.run(engine.generate(prompts, params, n=n))


def full_forward_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_attributes(engine, tiny_model_dir):
    assert engine.max_model_len == 2048
    assert engine.has_chat_template is (engine.model_dir != tiny_model_dir)
    assert engine.count_tokens("Write a poem") == len(engine.encode("Write a poem")) > 0


def test_greedy_is_deterministic(engine):
    first = solo(engine, PROMPTS[0], GREEDY)
    assert len(first.token_ids) > 0
    assert solo(engine, PROMPTS[0], GREEDY) == first


def test_batched_equals_unbatched_greedy(engine):
    alone = [solo(engine, p, GREEDY) for p in PROMPTS]
    before = engine.stats()
    together = batched(engine, PROMPTS, GREEDY)
    after = engine.stats()
    assert after["sequences_run"] - before["sequences_run"] == len(PROMPTS)
    assert after["batches_run"] - before["batches_run"] < len(PROMPTS), "prompts were not batched"
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids
        assert b.text == a.text


def test_n_choices_are_prompt_major(engine):
    results = batched(engine, PROMPTS[:2], GREEDY, n=2)
    assert [r.prompt_token_ids for r in results] == [engine.encode(p) for p in PROMPTS[:2] for _ in range(2)]


def test_stop_string_cuts_text(engine):
    full = solo(engine, PROMPTS[0], GREEDY)
    stop = full.text[6:9]
    assert stop.strip(), f"tiny model output too short for this test: {full.text!r}"
    cut = solo(engine, PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, stop=("zzz-never", stop)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert len(cut.token_ids) < len(full.token_ids)


def test_length_finish_and_zero_max_tokens(engine):
    result = solo(engine, PROMPTS[1], SamplingParams(max_tokens=5, temperature=0))
    assert (len(result.token_ids), result.finish_reason) == (5, "length")
    scored = solo(engine, PROMPTS[1], SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert (scored.token_ids, scored.text, scored.finish_reason) == ([], "", "length")
    assert len(scored.prompt_logprobs) == len(scored.prompt_token_ids)


def test_seeded_sampling_is_reproducible_across_batches(engine):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    alone = solo(engine, PROMPTS[0], params)
    in_batch = batched(engine, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], params)[1]
    assert in_batch.token_ids == alone.token_ids
    other_seed = solo(engine, PROMPTS[0], SamplingParams(max_tokens=10, temperature=1.0, seed=4321))
    assert other_seed.token_ids != alone.token_ids
    # n > 1 with a seed: choice i uses seed + i.
    choices = batched(engine, [PROMPTS[0]], params, n=2)
    assert choices[0].token_ids == alone.token_ids
    assert choices[1].token_ids == solo(engine, PROMPTS[0], SamplingParams(max_tokens=10, seed=1235)).token_ids


def test_tiny_top_p_is_greedy(engine):
    nucleus = solo(engine, PROMPTS[3], SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=7))
    assert nucleus.token_ids == solo(engine, PROMPTS[3], SamplingParams(max_tokens=8, temperature=0)).token_ids


def test_prompt_logprobs_match_full_forward(engine):
    params = SamplingParams(max_tokens=0, prompt_logprobs=3)
    # Batched with a longer prompt, so the short one is left-padded.
    short, _ = batched(engine, [PROMPTS[0], PROMPTS[1]], params)
    ids = short.prompt_token_ids
    reference = full_forward_logprobs(engine, ids)
    assert short.prompt_logprobs[0] is None
    for pos, entry in enumerate(short.prompt_logprobs[1:], start=1):
        row = reference[pos - 1]
        assert entry.token_id == ids[pos]
        assert entry.logprob == pytest.approx(float(row[ids[pos]]), abs=1e-4)
        assert entry.rank == int((row > row[ids[pos]]).sum()) + 1
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()


def test_generated_logprobs_match_full_forward(engine):
    result = batched(engine, [PROMPTS[1], PROMPTS[3]], SamplingParams(max_tokens=8, temperature=0, logprobs=2))[1]
    reference = full_forward_logprobs(engine, result.prompt_token_ids + result.token_ids)
    start = len(result.prompt_token_ids) - 1
    for step, (token, entry) in enumerate(zip(result.token_ids, result.logprobs)):
        row = reference[start + step]
        assert entry.token_id == token == int(row.argmax())  # greedy picks the top token
        assert entry.rank == 1
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(2).indices.tolist()


@pytest.mark.parametrize(
    ("prompt", "params", "error"),
    [
        ("", GREEDY, ValueError),
        ([10**6], GREEDY, ValueError),
        ("x" * 2100, GREEDY, ContextLengthError),
        ("hi", SamplingParams(max_tokens=2100), ContextLengthError),
    ],
)
def test_invalid_requests_are_rejected_before_queuing(engine, prompt, params, error):
    with pytest.raises(error):
        engine.submit(prompt, params)


@pytest.mark.parametrize(("field", "value"), [("max_tokens", -1), ("temperature", -0.5), ("top_p", 0), ("top_p", 1.1), ("logprobs", 21), ("seed", 2**63)])
def test_invalid_sampling_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_failing_sequence_fails_alone(engine, monkeypatch, caplog):
    """A sequence that breaks the model mid-batch fails by itself; its batch mates and the worker go on."""
    poison = engine.encode("0")[0]
    forward = engine.model.forward

    def fragile_forward(*args, input_ids, **kwargs):
        if input_ids.shape[1] > 1 and (input_ids == poison).any():  # prefill of a poisoned prompt
            raise RuntimeError("poisoned prompt")
        return forward(*args, input_ids=input_ids, **kwargs)

    expected = [solo(engine, p, GREEDY) for p in (PROMPTS[0], PROMPTS[1])]
    monkeypatch.setattr(engine.model, "forward", fragile_forward)
    futures = [engine.submit(p, GREEDY) for p in (PROMPTS[0], "0 0", PROMPTS[1])]
    wait(futures, timeout=60)
    assert futures[0].result() == expected[0]
    assert futures[2].result() == expected[1]
    with pytest.raises(RuntimeError, match="poisoned"):
        futures[1].result()
    assert solo(engine, PROMPTS[0], GREEDY) == expected[0]
    assert "retrying its sequences one at a time" in caplog.text  # they really shared a batch


def test_close_stops_the_worker(tiny_model_dir):
    engine = Engine(tiny_model_dir)
    engine.close()
    assert not engine._worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("hi", GREEDY)


def _on_decode_steps(engine: Engine, monkeypatch, hook) -> None:
    """Call `hook(step, input_ids, attention_mask)` on the worker thread before each decode step (not prefills)."""
    forward = engine.model.forward
    steps = []

    def spying_forward(*args, input_ids, attention_mask, past_key_values, **kwargs):
        if past_key_values.get_seq_length() > 0:
            steps.append(None)
            hook(len(steps), input_ids, attention_mask)
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", spying_forward)


def test_sequences_joining_mid_flight_match_alone(engine, monkeypatch):
    """Sequences queued while a batch decodes join it at the next step (one with a longer context than the running
    row, one with a shorter), produce what they produce alone, and resolve while the batch's longest row goes on."""
    long_params = SamplingParams(max_tokens=40, temperature=0)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    joiners = {3: (PROMPTS[3], GREEDY), 15: (PROMPTS[0], seeded)}  # decode step at which each is submitted
    expected_long = solo(engine, PROMPTS[2], long_params)
    expected = [solo(engine, prompt, params) for prompt, params in joiners.values()]
    assert len(expected_long.token_ids) == 40, "the running row must outlast the joiners"
    joined, batch_sizes, done_early = [], [], []

    def hook(step, input_ids, attention_mask):
        batch_sizes.append(input_ids.shape[0])
        done_early.append([f.done() for f in joined])
        if step in joiners:
            joined.append(engine.submit(*joiners[step]))

    _on_decode_steps(engine, monkeypatch, hook)
    long = engine.submit(PROMPTS[2], long_params)
    assert long.result(timeout=60) == expected_long
    assert [f.result(timeout=60) for f in joined] == expected
    assert max(batch_sizes) == 2, "the joiners did not share the running batch"
    assert done_early[-1] == [True, True], "finished joiners waited for the longest row"


def test_finished_rows_leave_at_once_and_padding_is_trimmed(engine, monkeypatch):
    """A row that finishes resolves its future at once, and its padding columns leave the cache with it."""
    short_params = SamplingParams(max_tokens=2, temperature=0)
    observed = []
    futures = []

    def hook(step, input_ids, attention_mask):
        observed.append((input_ids.shape[0], bool(attention_mask.all()), [f.done() for f in futures]))

    expected = [solo(engine, PROMPTS[1], short_params), solo(engine, PROMPTS[2], GREEDY)]
    monkeypatch.setattr(engine, "batch_wait_s", 0.2)  # so both surely start in one batch
    _on_decode_steps(engine, monkeypatch, hook)
    futures.extend(engine.submit(p, params) for p, params in ((PROMPTS[1], short_params), (PROMPTS[2], GREEDY)))
    assert [f.result(timeout=60) for f in futures] == expected
    assert observed[0] == (2, False, [False, False])  # one batch; the short prompt "0" is left-padded
    # After the long-prompt row left: a batch of one, resolved, and no padding column left in the cache.
    assert observed[-1] == (1, True, [True, False])


def test_failing_decode_step_reruns_rows_alone(engine, monkeypatch, caplog):
    """A decode step that fails re-runs its rows one by one from scratch; the seeds make the results unchanged."""
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=99)
    expected = [solo(engine, PROMPTS[0], GREEDY), solo(engine, PROMPTS[3], seeded)]

    def hook(step, input_ids, attention_mask):
        if input_ids.shape[0] > 1:
            raise RuntimeError("batched decode broke")

    monkeypatch.setattr(engine, "batch_wait_s", 0.2)
    _on_decode_steps(engine, monkeypatch, hook)
    futures = [engine.submit(PROMPTS[0], GREEDY), engine.submit(PROMPTS[3], seeded)]
    assert [f.result(timeout=60) for f in futures] == expected
    assert "retrying its sequences one at a time" in caplog.text
