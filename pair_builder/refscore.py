"""Reference log-probs of kept pairs, scored by the server that holds the 16-bit reference model.

The trainer (TRL 1.15's DPOTrainer) appends the eos token to each response, tokenizes ``prompt`` and
``prompt + response + eos``, and sums the policy's log-probs over the tokens after their common prefix.
Supplied reference log-probs must be the same sum under the reference model, token for token, or the DPO
loss is wrong. So one request scores ``[prompt, prompt+chosen+eos, prompt+rejected+eos]`` on
``/v1/completions`` with ``echo=True, logprobs=1, max_tokens=0`` and vLLM's ``return_tokens_as_token_ids``
(token ids, not decoded text, so byte-level fragments that decode alike are told apart); the boundary is
TRL's: the shorter common prefix of the prompt's ids with each full sequence's ids. The trainer re-checks
a few rows against its own reference pass (``train.ref_check_*``).

A prompt token that merges with the response's first characters (rare: the template's prompt ends with a
newline, which BPE pre-tokenizers split on) shortens the common prefix; that row is reported as straddled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pair_builder.sample import Usage


@dataclass(frozen=True)
class ResponseLogprob:
    logp: float
    tokens: int
    straddled: bool


def common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def completion_logprobs(prompt_tokens: list[str], full: list[tuple[list[str], list[float | None]]]
                        ) -> list[ResponseLogprob]:
    """Summed log-probs of each full sequence's tokens after the shared prompt prefix (TRL's boundary)."""
    prompt_len = min(common_prefix(prompt_tokens, toks) for toks, _ in full)
    out = []
    for toks, lps in full:
        if len(toks) != len(lps):
            raise ValueError("tokens and token_logprobs must have the same length")
        tail = lps[prompt_len:]
        if not tail:
            raise ValueError("no response tokens after the prompt; is the response empty?")
        if any(lp is None for lp in tail):
            raise ValueError("a response token has no log-prob; the prompt is empty or the server is not echoing")
        out.append(ResponseLogprob(float(sum(tail)), len(tail), prompt_len < len(prompt_tokens)))
    return out


def score_responses(client: Any, model: str, prompt: str, responses: list[str], *, usage: Usage,
                    eos: str = "") -> list[ResponseLogprob]:
    """Reference log-probs of each ``response + eos`` given ``prompt``, all in one request."""
    resp = client.completions.create(
        model=model, prompt=[prompt, *(prompt + r + eos for r in responses)], max_tokens=0, echo=True,
        logprobs=1, temperature=0.0, extra_body={"return_tokens_as_token_ids": True})
    usage.add(resp)
    choices = sorted(resp.choices, key=lambda c: c.index)
    if len(choices) != len(responses) + 1 or any(c.logprobs is None for c in choices):
        raise ValueError("the server returned no echo log-probs; gen_server (embedded or vLLM) answers "
                         "echo=True with logprobs - set pairs.ref_logprobs=false for other servers")
    return completion_logprobs(list(choices[0].logprobs.tokens),
                               [(list(c.logprobs.tokens), list(c.logprobs.token_logprobs)) for c in choices[1:]])


def score_pair(client: Any, model: str, prompt: str, chosen: str, rejected: str, *,
               usage: Usage, eos: str = "") -> tuple[ResponseLogprob, ResponseLogprob]:
    """Reference log-probs of ``chosen + eos`` and ``rejected + eos`` given ``prompt`` (one request)."""
    lc, lr = score_responses(client, model, prompt, [chosen, rejected], usage=usage, eos=eos)
    return lc, lr
