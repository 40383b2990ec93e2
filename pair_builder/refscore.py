"""Reference log-probs of kept pairs, scored by the server that holds the 16-bit reference model.

One request per pair: ``/v1/completions`` with ``prompt=[prompt+chosen, prompt+rejected]``, ``echo=True``,
``logprobs=1``, ``max_tokens=0`` returns every prompt token's log-prob (the first is None) and its
``text_offset``. The response's log-prob is the sum over tokens that start at or after the boundary
between prompt and response text. The trainer then needs no reference forward pass (TRL's precomputed
reference log-probs, stored as ``ref_chosen_logps`` / ``ref_rejected_logps``).

Boundary: a token that straddles it (starts inside the prompt, ends inside the response) is counted in
the response, because its probability covers response characters; dropping it would leave those out.
The template's prompt ends with a newline (``# Answer:\\n``), which BPE pre-tokenizers split on, so a
straddle is rare; it is reported so the trainer's reference check (``train.ref_check_*``) can be trusted.
The boundary is found from the *end* of the scored text (decoded tokens must end with the response), so
a BOS token the server decodes as text (``<s>``) does not shift it; when a character split over tokens
breaks that match, from where the prompt text ends among the decoded tokens.
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


def response_logprob(tokens: list[str], token_logprobs: list[float | None], text_offset: list[int],
                     response: str, prompt: str) -> ResponseLogprob:
    """Summed log-prob of the ``response`` tokens in an echoed prompt+response (see module doc)."""
    if not (len(tokens) == len(token_logprobs) == len(text_offset)):
        raise ValueError("tokens, token_logprobs and text_offset must have the same length")
    joined = "".join(tokens)
    if joined.endswith(response):
        boundary = len(joined) - len(response)
    elif (at := joined.find(prompt)) >= 0:  # the response did not decode token by token (split UTF-8)
        boundary = at + len(prompt)
    else:
        boundary = len(prompt)
    total, n, straddled = 0.0, 0, False
    for tok, lp, off in zip(tokens, token_logprobs, text_offset, strict=True):
        if off + len(tok) <= boundary:
            continue
        if off < boundary:
            straddled = True
        if lp is None:  # only the first token of a sequence has none; it cannot be a response token
            raise ValueError("a response token has no log-prob; the response is empty or the server is not echoing")
        total += lp
        n += 1
    if n == 0:
        raise ValueError("no response tokens found in the echoed text; is the response empty?")
    return ResponseLogprob(total, n, straddled)


def score_pair(client: Any, model: str, prompt: str, chosen: str, rejected: str, *,
               usage: Usage) -> tuple[ResponseLogprob, ResponseLogprob]:
    """Reference log-probs of chosen and rejected given ``prompt`` (one request for both)."""
    resp = client.completions.create(model=model, prompt=[prompt + chosen, prompt + rejected], max_tokens=0,
                                     echo=True, logprobs=1, temperature=0.0)
    usage.add(resp)
    choices = sorted(resp.choices, key=lambda c: c.index)
    if len(choices) != 2 or any(c.logprobs is None for c in choices):
        raise ValueError("the server returned no echo log-probs; gen_server (embedded or vLLM) answers "
                         "echo=True with logprobs - set pairs.ref_logprobs=false for other servers")
    out = []
    for c, response in zip(choices, (chosen, rejected), strict=True):
        lp = c.logprobs
        out.append(response_logprob(list(lp.tokens), list(lp.token_logprobs), list(lp.text_offset), response, prompt))
    return out[0], out[1]
