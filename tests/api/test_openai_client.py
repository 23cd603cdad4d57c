"""The official `openai` client against the app: what real users run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from shuffleinfer.api import create_app

from .conftest import API_KEY, REPLY, FakeBackend


@pytest.fixture
async def openai_client(backend: FakeBackend) -> AsyncIterator[openai.AsyncOpenAI]:
    """An AsyncOpenAI client wired to an app that checks the api key."""
    app = create_app(backend, served_model_name="smol", api_key=API_KEY)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    # openai ships its own httpx fork; it accepts a plain httpx client too.
    async with openai.AsyncOpenAI(http_client=http,  # type: ignore[arg-type]
                                  base_url="http://test/v1",
                                  api_key=API_KEY, max_retries=0) as client:
        yield client


async def test_chat_non_streaming(openai_client: openai.AsyncOpenAI,
                                  backend: FakeBackend) -> None:
    completion = await openai_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Hi!"}], max_tokens=50,
        temperature=0.7, top_p=0.9, seed=1, stop=["\n\n"], logprobs=True, top_logprobs=1)

    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert [lp.token for lp in choice.logprobs.content] == [
        backend.tokenizer.decode([t]) for t in backend.reply_ids]
    assert choice.logprobs.content[0].top_logprobs[0].token == "alt0"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(backend.reply_ids)
    assert completion.usage.prompt_tokens == len(backend.requests[0].prompt_token_ids)
    assert backend.requests[0].sampling.stop == ("\n\n",)


async def test_chat_streaming_with_usage(openai_client: openai.AsyncOpenAI,
                                         backend: FakeBackend) -> None:
    stream = await openai_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Hi!"}], stream=True,
        stream_options={"include_usage": True}, max_completion_tokens=4)

    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == backend.tokenizer.decode(backend.reply_ids[:4])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_completions_streaming(openai_client: openai.AsyncOpenAI,
                                     backend: FakeBackend) -> None:
    stream = await openai_client.completions.create(model="smol", prompt="Say hi",
                                                    stream=True, max_tokens=3, logprobs=1)

    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks) == backend.tokenizer.decode(
        backend.reply_ids[:3])
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_errors_map_to_openai_exceptions(openai_client: openai.AsyncOpenAI,
                                               backend: FakeBackend) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await openai_client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "Hi!"}])
    with pytest.raises(openai.BadRequestError) as bad:
        await openai_client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Hi!"}], n=2)
    assert bad.value.param == "n"
    backend.fail_at = 0
    with pytest.raises(openai.InternalServerError):
        await openai_client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Hi!"}], stream=True)


async def test_models_list(openai_client: openai.AsyncOpenAI) -> None:
    models = [model.id async for model in openai_client.models.list()]
    assert models == ["smol"]
