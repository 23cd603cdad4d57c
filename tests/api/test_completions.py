"""POST /v1/completions: text and token-id prompts, streaming framing, usage, logprobs."""

from __future__ import annotations

import httpx

from .conftest import REPLY, FakeBackend, parse_sse


async def test_non_streaming_returns_text_and_exact_usage(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/completions", json={"model": "smol", "prompt": "Say hi"})

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-") and len(body["id"]) == len("cmpl-") + 32
    assert body["model"] == "smol"
    assert body["choices"] == [{"index": 0, "text": REPLY, "logprobs": None,
                                "finish_reason": "stop"}]
    num_prompt = len(backend.tokenizer.encode("Say hi"))
    num_reply = len(backend.reply_ids)
    assert body["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": num_reply,
                             "total_tokens": num_prompt + num_reply}
    assert backend.completed == [body["id"]]


async def test_sampling_fields_reach_the_backend(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/completions", json={
        "prompt": "Say hi", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "seed": 7,
        "stop": ["\n", "END"], "ignore_eos": True, "min_tokens": 2})

    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 3
    (request,) = backend.requests
    assert request.prompt_token_ids == tuple(backend.tokenizer.encode("Say hi"))
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed) == (
        3, 0.5, 0.9, 7)
    assert sampling.stop == ("\n", "END")
    assert (sampling.ignore_eos, sampling.min_tokens, sampling.logprobs) == (True, 2, None)


async def test_single_stop_string_and_default_max_tokens(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    await client.post("/v1/completions", json={"prompt": "Say hi", "stop": "."})

    (request,) = backend.requests
    assert request.sampling.stop == (".",)
    assert request.sampling.max_tokens == backend.max_model_len - len(request.prompt_token_ids)


async def test_token_id_prompts_and_one_element_lists(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    for prompt in ([5, 6, 7], [[5, 6, 7]]):
        response = await client.post("/v1/completions", json={"prompt": prompt})
        assert response.status_code == 200
        assert response.json()["usage"]["prompt_tokens"] == 3
    await client.post("/v1/completions", json={"prompt": ["Say hi"]})
    assert [r.prompt_token_ids for r in backend.requests] == [
        (5, 6, 7), (5, 6, 7), tuple(backend.tokenizer.encode("Say hi"))]


async def test_streaming_chunks_are_sse_framed_and_end_with_done(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/completions",
                                 json={"prompt": "Say hi", "stream": True, "max_tokens": 4})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == 4
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    texts = [c["choices"][0]["text"] for c in chunks]
    assert texts == [backend.tokenizer.decode([t]) for t in backend.reply_ids[:4]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]


async def test_include_usage_adds_a_final_usage_chunk(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/completions", json={
        "prompt": "Say hi", "stream": True, "max_tokens": 2,
        "stream_options": {"include_usage": True}})

    *chunks, usage_chunk, done = parse_sse(response.text)
    assert done == "[DONE]"
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == []
    num_prompt = len(backend.tokenizer.encode("Say hi"))
    assert usage_chunk["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 2,
                                    "total_tokens": num_prompt + 2}


async def test_logprobs_object_has_openai_shape(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/completions",
                                 json={"prompt": "Say hi", "max_tokens": 3, "logprobs": 2})

    assert backend.requests[0].sampling.logprobs == 2
    logprobs = response.json()["choices"][0]["logprobs"]
    tokens = [backend.tokenizer.decode([t]) for t in backend.reply_ids[:3]]
    assert logprobs["tokens"] == tokens
    assert logprobs["token_logprobs"] == [-0.25, -0.5, -0.75]
    assert logprobs["top_logprobs"] == [{"alt0": -1.0, "alt1": -2.0}] * 3
    assert logprobs["text_offset"] == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]


async def test_streamed_logprobs_continue_the_text_offset(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/completions", json={
        "prompt": "Say hi", "max_tokens": 3, "logprobs": 0, "stream": True})

    chunks = parse_sse(response.text)[:-1]
    offsets = [c["choices"][0]["logprobs"]["text_offset"] for c in chunks]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert offsets == [[0], [len(texts[0])], [len(texts[0]) + len(texts[1])]]
    assert [c["choices"][0]["logprobs"]["top_logprobs"] for c in chunks] == [[{}]] * 3
