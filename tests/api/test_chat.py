"""POST /v1/chat/completions: template rendering, streaming chunks, usage, logprobs."""

from __future__ import annotations

import httpx

from .conftest import REPLY, FakeBackend, parse_sse

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def rendered_ids(backend: FakeBackend, messages: list[dict[str, str]]) -> list[int]:
    """What the prompt should be: the chat template's text, tokenised once."""
    text = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
    return backend.tokenizer.encode(text, add_special_tokens=False)


async def test_non_streaming_returns_the_assistant_message(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/chat/completions",
                                 json={"model": "smol", "messages": MESSAGES})

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": REPLY},
                                "logprobs": None, "finish_reason": "stop"}]
    num_prompt = len(rendered_ids(backend, MESSAGES))
    assert body["usage"] == {"prompt_tokens": num_prompt,
                             "completion_tokens": len(backend.reply_ids),
                             "total_tokens": num_prompt + len(backend.reply_ids)}


async def test_prompt_is_the_rendered_template_with_a_single_bos(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    await client.post("/v1/chat/completions", json={"messages": MESSAGES})

    prompt = list(backend.requests[0].prompt_token_ids)
    assert prompt == rendered_ids(backend, MESSAGES)
    bos = backend.tokenizer.bos_token_id
    assert prompt[:2] != [bos, bos]
    assert backend.tokenizer.decode(prompt).rstrip().endswith("assistant")


async def test_content_parts_and_developer_role_render_like_plain_text(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    await client.post("/v1/chat/completions", json={"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text",
                                                                     "text": "i!"}]}]})

    assert list(backend.requests[0].prompt_token_ids) == rendered_ids(backend, MESSAGES)


async def test_max_completion_tokens_wins_over_max_tokens(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 2})

    assert backend.requests[0].sampling.max_tokens == 2
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 2


async def test_streaming_starts_with_the_role_and_ends_with_finish_and_done(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/chat/completions",
                                 json={"messages": MESSAGES, "stream": True})

    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith('data: {"id":"chatcmpl-')
    assert response.text.endswith("\n\ndata: [DONE]\n\n")
    *chunks, done = parse_sse(response.text)
    assert done == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == REPLY
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_streaming_include_usage(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    response = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "stream": True, "max_tokens": 3,
        "stream_options": {"include_usage": True}})

    *chunks, usage_chunk, done = parse_sse(response.text)
    assert all("usage" in c and c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["object"] == "chat.completion.chunk"
    assert usage_chunk["usage"]["prompt_tokens"] == len(rendered_ids(backend, MESSAGES))
    assert usage_chunk["usage"]["completion_tokens"] == 3


async def test_logprobs_content_list(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    response = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "max_tokens": 2, "logprobs": True, "top_logprobs": 2})

    assert backend.requests[0].sampling.logprobs == 2
    content = response.json()["choices"][0]["logprobs"]["content"]
    first = backend.tokenizer.decode([backend.reply_ids[0]])
    assert [entry["token"] for entry in content] == [
        backend.tokenizer.decode([t]) for t in backend.reply_ids[:2]]
    assert content[0] == {
        "token": first, "logprob": -0.25, "bytes": list(first.encode()),
        "top_logprobs": [{"token": "alt0", "logprob": -1.0, "bytes": list(b"alt0")},
                         {"token": "alt1", "logprob": -2.0, "bytes": list(b"alt1")}]}


async def test_logprobs_without_top_logprobs_asks_for_zero_alternatives(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "max_tokens": 2, "logprobs": True, "stream": True})

    assert backend.requests[0].sampling.logprobs == 0
    chunks = parse_sse(response.text)[1:-1]  # after the role chunk, before [DONE]
    assert [len(c["choices"][0]["logprobs"]["content"]) for c in chunks] == [1, 1]
    assert chunks[0]["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
