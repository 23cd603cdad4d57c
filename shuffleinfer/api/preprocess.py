"""From a validated request body to a `GenerateRequest`: render, tokenise, check limits.

Everything here raises `APIError` (400/404) with a message that tells the client what to
fix; nothing reaches the backend unless it fits the model's context.
"""

from __future__ import annotations

import uuid
from typing import Any

from shuffleinfer.api.errors import APIError, bad_request
from shuffleinfer.api.openai_models import BaseRequest, ChatCompletionRequest, CompletionRequest
from shuffleinfer.protocol import GenerateRequest, SamplingOptions


def new_req_id(prefix: str) -> str:
    """A fresh request id, e.g. `cmpl-<uuid hex>` or `chatcmpl-<uuid hex>`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def check_common(request: BaseRequest, accepted_models: tuple[str, ...]) -> str:
    """Checks shared by both endpoints; returns the model name to echo in responses."""
    unsupported = request.unsupported_field()
    if unsupported is not None:
        value = getattr(request, unsupported)
        raise bad_request(f"Unsupported value for `{unsupported}`: {value!r}. Only the "
                          "default is supported.", unsupported)
    if request.model is not None and request.model not in accepted_models:
        raise APIError(404, f"The model `{request.model}` does not exist.", param="model")
    if request.stream_options is not None and not request.stream:
        raise bad_request("`stream_options` can only be set when `stream` is true.",
                          "stream_options")
    if any(not stop for stop in request.stop_strings()):
        raise bad_request("`stop` strings must not be empty.", "stop")
    return request.model if request.model is not None else accepted_models[0]


def single_prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> str | list[int]:
    """The one prompt of a request: text or token ids, unwrapped from a one-element list."""
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        return []
    first = prompt[0]
    if isinstance(first, int):
        return prompt  # type: ignore[return-value]  # a list of ints, as its head says
    if len(prompt) > 1:
        raise bad_request("Only one prompt per request is supported.", "prompt")
    return first


def completion_prompt_ids(request: CompletionRequest, tokenizer: Any) -> list[int]:
    """Token ids of a /v1/completions prompt (text gets the tokenizer's special tokens)."""
    prompt = single_prompt(request.prompt)
    if not prompt:
        raise bad_request("The prompt must not be empty.", "prompt")
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    vocab_size = len(tokenizer)
    for token_id in prompt:
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"Prompt token id {token_id!r} is out of the vocabulary "
                              f"(0..{vocab_size - 1}).", "prompt")
    return list(prompt)


def chat_prompt_ids(request: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """Token ids of the chat rendered through the model's chat template."""
    # OpenAI's "developer" role is what chat templates know as "system".
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in request.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # jinja raises for e.g. roles that do not alternate
        raise bad_request(f"The chat template rejected the messages: {e}", "messages") from e
    # The template already holds any BOS token; adding special tokens would double it.
    return list(tokenizer.encode(text, add_special_tokens=False))


def sampling_options(
    request: BaseRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
) -> SamplingOptions:
    """Check the prompt fits the context and map the body onto `SamplingOptions`.

    `max_tokens` None means whatever room the context leaves, as in vLLM.
    """
    if num_prompt_tokens == 0:
        raise bad_request("The prompt must not be empty.", prompt_param)
    if num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains {num_prompt_tokens} tokens, which leaves no room for the "
            "completion. Please reduce the length of the prompt.", prompt_param)
    if max_tokens is None:
        max_tokens = max_model_len - num_prompt_tokens
    elif num_prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} in the completion). Please reduce the length of the "
            "prompt or the completion.", max_tokens_param)
    if request.min_tokens > max_tokens:
        raise bad_request(f"`min_tokens` ({request.min_tokens}) must not exceed the maximum "
                          f"number of generated tokens ({max_tokens}).", "min_tokens")
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=request.stop_strings(),
        logprobs=logprobs,
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
    )


def prepare_completion(
    request: CompletionRequest, tokenizer: Any, max_model_len: int
) -> GenerateRequest:
    """The `GenerateRequest` for a /v1/completions body."""
    prompt_ids = completion_prompt_ids(request, tokenizer)
    sampling = sampling_options(request, max_tokens=request.max_tokens,
                                logprobs=request.logprobs, num_prompt_tokens=len(prompt_ids),
                                max_model_len=max_model_len, prompt_param="prompt")
    prompt = single_prompt(request.prompt)
    return GenerateRequest(new_req_id("cmpl"), tuple(prompt_ids), sampling,
                           prompt_text=prompt if isinstance(prompt, str) else "")


def prepare_chat(
    request: ChatCompletionRequest, tokenizer: Any, max_model_len: int
) -> GenerateRequest:
    """The `GenerateRequest` for a /v1/chat/completions body."""
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("`top_logprobs` needs `logprobs` to be true.", "top_logprobs")
    prompt_ids = chat_prompt_ids(request, tokenizer)
    max_tokens_param = ("max_completion_tokens" if request.max_completion_tokens is not None
                        else "max_tokens")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    sampling = sampling_options(request, max_tokens=getattr(request, max_tokens_param),
                                logprobs=logprobs, num_prompt_tokens=len(prompt_ids),
                                max_model_len=max_model_len, prompt_param="messages",
                                max_tokens_param=max_tokens_param)
    last_user = next((m.text() for m in reversed(request.messages) if m.role == "user"), "")
    return GenerateRequest(new_req_id("chatcmpl"), tuple(prompt_ids), sampling,
                           prompt_text=last_user, is_chat=True)
