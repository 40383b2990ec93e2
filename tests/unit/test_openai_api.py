"""The embedded server's OpenAI API as pure functions: prompt parsing, sampling settings, limits, errors and the
response bodies, on hand-made `Completion`s and a four-token fake tokenizer (no server, no model)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gen_server.engine import Completion, SamplingParams, TokenLogprob
from gen_server.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    RequestLimits,
    chat_response,
    chat_sampling_params,
    check_model,
    completion_prompts,
    completion_response,
    completion_sampling_params,
    error_body,
    invalid_request,
    models_response,
    reject_streaming,
    sampling_params,
    usage,
)

VOCAB = {1: "He", 2: "llo", 3: " wörld", 4: "!"}


class FakeTokenizer:
    def decode(self, token_ids: list[int]) -> str:
        return "".join(VOCAB[t] for t in token_ids)


TOK = FakeTokenizer()


def done(text: str, token_ids: list[int], finish_reason: str = "length", *, prompt: tuple[int, ...] = (1,),
         logprobs=None, prompt_logprobs=None) -> Completion:
    return Completion(prompt_token_ids=list(prompt), token_ids=token_ids, text=text, finish_reason=finish_reason,
                      logprobs=logprobs, prompt_logprobs=prompt_logprobs)


# ---- prompts and settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, expected", [
    ("Hello", ["Hello"]),
    (["Hello", "Bye"], ["Hello", "Bye"]),
    ([1, 2, 3], [[1, 2, 3]]),  # a list of ints is ONE token-id prompt
    ([[1, 2], [3]], [[1, 2], [3]]),
    ("", [""]),  # an empty string is a prompt; the engine's encode refuses it
])
def test_completion_prompts(prompt, expected):
    assert completion_prompts(prompt) == expected
    assert completion_prompts(CompletionRequest(prompt=prompt).prompt) == expected  # as the route gets it


def test_completion_prompts_empty_list_is_400():
    with pytest.raises(APIError) as info:
        completion_prompts(CompletionRequest(prompt=[]).prompt)
    assert (info.value.status, info.value.message, info.value.param) == (400, "the prompt is empty", "prompt")


def test_negative_token_ids_fail_validation():
    with pytest.raises(ValidationError):
        CompletionRequest(prompt=[1, -2])


def test_sampling_params_defaults_and_stop():
    req = CompletionRequest(prompt="x", stop="\n", seed=7)
    assert sampling_params(req, 5, logprobs=2) == SamplingParams(
        max_tokens=5, temperature=1.0, top_p=1.0, stop=("\n",), seed=7, logprobs=2)
    req = CompletionRequest(prompt="x", temperature=0, top_p=0.5, stop=["a", "", "b"])
    assert sampling_params(req, 3) == SamplingParams(max_tokens=3, temperature=0.0, top_p=0.5, stop=("a", "b"))


def test_completion_sampling_params():
    # max_tokens=None is the rest of the context after the longest prompt
    params = completion_sampling_params(CompletionRequest(prompt="x", max_tokens=None), [3, 10], 64)
    assert (params.max_tokens, params.logprobs, params.prompt_logprobs) == (54, None, None)
    assert completion_sampling_params(CompletionRequest(prompt="x", max_tokens=None), [70], 64).max_tokens == 0
    # echoed logprobs need prompt log-probs at least as deep; prompt_logprobs alone asks for them too
    params = completion_sampling_params(CompletionRequest(prompt="x", echo=True, logprobs=3, prompt_logprobs=1),
                                        [3], 64)
    assert (params.max_tokens, params.logprobs, params.prompt_logprobs) == (16, 3, 3)
    params = completion_sampling_params(CompletionRequest(prompt="x", logprobs=3, prompt_logprobs=0), [3], 64)
    assert (params.logprobs, params.prompt_logprobs) == (3, 0)
    assert completion_sampling_params(CompletionRequest(prompt="x", logprobs=2), [3], 64).prompt_logprobs is None


def test_chat_sampling_params():
    msgs = [{"role": "user", "content": "hi"}]
    req = ChatCompletionRequest(messages=msgs, max_tokens=9, max_completion_tokens=3, logprobs=True, top_logprobs=2)
    params = chat_sampling_params(req, 5, 64)
    assert (params.max_tokens, params.logprobs) == (3, 2)
    params = chat_sampling_params(ChatCompletionRequest(messages=msgs, logprobs=True), 5, 64)
    assert (params.max_tokens, params.logprobs) == (59, 0)
    assert chat_sampling_params(ChatCompletionRequest(messages=msgs, top_logprobs=2), 5, 64).logprobs is None


def test_checks():
    check_model(None, "tiny")
    check_model("tiny", "tiny")
    with pytest.raises(APIError) as info:
        check_model("other", "tiny")
    assert (info.value.status, info.value.param) == (404, "model")
    assert info.value.message == "The model `other` does not exist. This server serves `tiny`."
    reject_streaming(CompletionRequest(prompt="x"))
    with pytest.raises(APIError, match="streaming is not supported"):
        reject_streaming(CompletionRequest(prompt="x", stream=True))


def test_request_limits():
    limits = RequestLimits(max_prompts=2, max_n=3, max_stop=1, max_request_tokens=100, max_scored_tokens=10)
    limits.check([10, 10], 3, 6, ("a",), scored=False)  # (10 + 6) * 3 choices * 2 prompts = 96 tokens
    limits.check([6, 4], 1, 1, (), scored=True)  # 10 prompt tokens scored
    cases = [
        (([1, 1, 1], 1, 1, (), False), "prompt", "3 prompts in one request"),
        (([1], 4, 1, (), False), "n", "n=4: this server gives at most 3 choices"),
        (([1], 1, 1, ("a", "b"), False), "stop", "stop: at most 1 strings"),
        (([1], 1, 1, ("a" * 257,), False), "stop", "stop: at most 1 strings"),
        (([10, 10], 3, 7, (), False), "prompt", "the request needs 102 tokens"),
        (([6, 5], 1, 1, (), True), "prompt", "log-probs over 11 prompt tokens"),
    ]
    for args, param, message in cases:
        with pytest.raises(APIError) as info:
            limits.check(*args)
        assert (info.value.status, info.value.param) == (400, param)
        assert info.value.message.startswith(message), info.value.message


# ---- errors -------------------------------------------------------------------------------------------------


def test_error_body():
    assert error_body(401, "no key") == {
        "error": {"message": "no key", "type": "AuthenticationError", "param": None, "code": 401}}
    assert error_body(400, "bad", "n")["error"] == {"message": "bad", "type": "BadRequestError", "param": "n",
                                                    "code": 400}
    assert error_body(503, "x")["error"]["type"] == "InternalServerError"
    assert error_body(422, "x")["error"]["type"] == "BadRequestError"


def test_invalid_request():
    error = invalid_request([
        {"type": "greater_than_equal", "loc": ("body", "n"), "msg": "Input should be greater than or equal to 1"},
        {"type": "missing", "loc": ("body", "messages", 0, "role"), "msg": "Field required"},
    ])
    assert (error.status, error.param) == (400, "n")
    assert error.message == ("Invalid request: n: Input should be greater than or equal to 1; "
                             "messages.0.role: Field required")
    error = invalid_request([{"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be an object"}])
    assert (error.message, error.param) == ("Invalid request: Input should be an object", None)
    error = invalid_request([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error"}])
    assert (error.status, error.message, error.param) == (400, "The request body is not valid JSON.", None)


# ---- responses ----------------------------------------------------------------------------------------------


def test_usage_sums_completion_tokens_over_choices():
    results = [done("a", [1, 2]), done("b", [3]), done("", [])]
    assert usage(7, results) == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert usage(0, []) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


RESULTS_2X2 = [done("p0c0", [4]), done("p0c1", [4, 4], "stop"), done("p1c0", [3]), done("p1c1", [], "stop")]


def test_completion_response_is_prompt_major_with_echo():
    req = CompletionRequest(prompt=["Hi ", "Bye "], n=2, echo=True)
    body = completion_response(req, completion_prompts(req.prompt), RESULTS_2X2, prompt_tokens=5, tokenizer=TOK,
                               model="tiny")
    assert body["id"].startswith("cmpl-") and len(body["id"]) == 5 + 32
    assert (body["object"], body["model"]) == ("text_completion", "tiny")
    assert isinstance(body["created"], int)
    assert body["choices"] == [  # prompt i's choices are i*n .. i*n+n-1
        {"index": 0, "text": "Hi p0c0", "logprobs": None, "finish_reason": "length"},
        {"index": 1, "text": "Hi p0c1", "logprobs": None, "finish_reason": "stop"},
        {"index": 2, "text": "Bye p1c0", "logprobs": None, "finish_reason": "length"},
        {"index": 3, "text": "Bye p1c1", "logprobs": None, "finish_reason": "stop"},
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def test_completion_response_echo_decodes_token_id_prompts():
    req = CompletionRequest(prompt=[[1, 2], [3]], n=2, echo=True)
    body = completion_response(req, completion_prompts(req.prompt), RESULTS_2X2, prompt_tokens=3, tokenizer=TOK,
                               model="tiny")
    assert [c["text"] for c in body["choices"]] == ["Hellop0c0", "Hellop0c1", " wörldp1c0", " wörldp1c1"]


def test_completion_response_without_echo_is_the_generated_text():
    req = CompletionRequest(prompt=[[1], [2]])
    results = [done(" one", [3]), done("!", [4], "stop")]
    body = completion_response(req, completion_prompts(req.prompt), results, prompt_tokens=2, tokenizer=TOK,
                               model="m")
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, " one", "length"), (1, "!", "stop")]
    assert "prompt_logprobs" not in body["choices"][0]


def test_completion_logprobs_with_echo():
    result = done(" wörld!", [3, 4], prompt=[1, 2],
                  prompt_logprobs=[None, TokenLogprob(2, -0.5, 1, [(2, -0.5), (4, -2.0)])],
                  logprobs=[TokenLogprob(3, -1.5, 2, [(4, -1.0), (3, -1.5)]), TokenLogprob(4, -0.25, 1, [(4, -0.25)])])
    req = CompletionRequest(prompt=[1, 2], echo=True, logprobs=1, max_tokens=2)
    [choice] = completion_response(req, [[1, 2]], [result], prompt_tokens=2, tokenizer=TOK, model="m")["choices"]
    assert choice["text"] == "Hello wörld!"
    assert choice["logprobs"] == {
        "tokens": ["He", "llo", " wörld", "!"],
        "token_logprobs": [None, -0.5, -1.5, -0.25],
        # the k=1 most likely plus the chosen token
        "top_logprobs": [None, {"llo": -0.5}, {"!": -1.0, " wörld": -1.5}, {"!": -0.25}],
        "text_offset": [0, 2, 5, 11],  # offsets in characters of the decoded text
    }
    assert "prompt_logprobs" not in choice  # echo alone does not add vLLM's prompt_logprobs field


def test_completion_logprobs_as_token_ids():
    result = done("!", [4], logprobs=[TokenLogprob(4, -0.25, 1, [(4, -0.25), (3, -3.0)])])
    req = CompletionRequest(prompt="x", logprobs=2, return_tokens_as_token_ids=True)
    [choice] = completion_response(req, ["x"], [result], prompt_tokens=1, tokenizer=TOK, model="m")["choices"]
    assert choice["logprobs"] == {"tokens": ["token_id:4"], "token_logprobs": [-0.25],
                                  "top_logprobs": [{"token_id:4": -0.25, "token_id:3": -3.0}], "text_offset": [0]}


def test_vllm_prompt_logprobs():
    result = done("", [], prompt=[1, 2], prompt_logprobs=[None, TokenLogprob(2, -3.0, 3, [(4, -0.5), (3, -1.0)])])
    req = CompletionRequest(prompt=[1, 2], max_tokens=0, prompt_logprobs=2)
    [choice] = completion_response(req, [[1, 2]], [result], prompt_tokens=2, tokenizer=TOK, model="m")["choices"]
    assert choice["prompt_logprobs"] == [None, {
        "2": {"logprob": -3.0, "rank": 3, "decoded_token": "llo"},
        "4": {"logprob": -0.5, "rank": 1, "decoded_token": "!"},
        "3": {"logprob": -1.0, "rank": 2, "decoded_token": " wörld"},
    }]
    assert choice["logprobs"] is None


def test_chat_response():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=2)
    results = [done("Hello", [1, 2], "stop"), done("He", [1])]
    body = chat_response(req, results, prompt_tokens=6, tokenizer=TOK, model="tiny")
    assert body["id"].startswith("chatcmpl-")
    assert (body["object"], body["model"]) == ("chat.completion", "tiny")
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "He"}, "logprobs": None, "finish_reason": "length"},
    ]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}


def test_chat_response_logprobs():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=1)
    result = done(" wörld", [3], logprobs=[TokenLogprob(3, -0.75, 2, [(4, -0.5), (3, -0.75)])])
    [choice] = chat_response(req, [result], prompt_tokens=1, tokenizer=TOK, model="m")["choices"]
    assert choice["logprobs"] == {"content": [{
        "token": " wörld", "logprob": -0.75, "bytes": list(" wörld".encode()),
        "top_logprobs": [{"token": "!", "logprob": -0.5, "bytes": [33]}],
    }]}


def test_models_response():
    body = models_response("tiny", "/models/tiny", 2048)
    [model] = body["data"]
    assert body["object"] == "list"
    assert isinstance(model.pop("created"), int)
    assert model == {"id": "tiny", "object": "model", "owned_by": "selfalign", "root": "/models/tiny",
                     "parent": None, "max_model_len": 2048}
