"""Request bodies of the OpenAI endpoints we serve, as strict pydantic models.

Strict means a JSON string is not an integer and `true` is not 1, as in OpenAI's API.
Fields fall in four groups:

- supported: mapped onto `SamplingOptions` (max_tokens, temperature, top_p, seed, stop,
  logprobs, ...) plus vLLM's `ignore_eos` and `min_tokens` extensions;
- ignored: bookkeeping fields that do not change the output (`user`, `metadata`, ...);
- default-only: OpenAI features we do not implement; accepted only at their default value
  so clients that send the default keep working, anything else is a 400 naming the field;
- anything else: an unknown field, a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_LOGPROBS = 20
"""Most alternatives per token a client may ask for (vLLM's default max_logprobs)."""


def one_error(expected: str) -> WrapValidator:
    """Report a union field's mismatch as one error saying what is `expected`, instead of
    one error per union member (which names types the client never wrote)."""

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union_type", "must be {expected}",
                                      {"expected": expected}) from None

    return WrapValidator(validate)


Prompt = Annotated[str | list[int] | list[str] | list[list[int]],
                   one_error("a string, a list of token ids, or a list holding one of those")]
Stop = Annotated[str | list[str] | None, one_error("a string or a list of strings")]


class StrictModel(BaseModel):
    """Base of every request model: unknown fields and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(StrictModel):
    """`stream_options` of a streaming request."""

    include_usage: bool | None = None
    """Send a last chunk with `usage` and empty `choices` before `[DONE]`."""
    include_obfuscation: bool | None = None
    """Accepted and ignored: we never pad chunks."""


class TextPart(StrictModel):
    """One part of a message's content; only text is supported."""

    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    """One chat message. Tool calls and non-text content are not supported."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart] | None, one_error(
        'a string or a list of {"type": "text", "text": ...} parts')] = None
    name: str | None = None
    """Accepted and ignored (chat templates do not render it)."""

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class BaseRequest(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    DEFAULT_ONLY: ClassVar[dict[str, tuple[Any, ...]]] = {
        "n": (None, 1),
        "frequency_penalty": (None, 0),
        "presence_penalty": (None, 0),
        "logit_bias": (None, {}),
    }
    """Unsupported OpenAI fields and the values we accept for them (their defaults)."""

    model: str | None = None
    """Must name the served model; None means the served model."""
    max_tokens: int | None = Field(None, ge=1)
    """None: as many as fit in the context (max_model_len - prompt length)."""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    """vLLM extension: keep generating after the end-of-sequence token."""
    min_tokens: int = Field(0, ge=0)
    """vLLM extension: never stop before this many tokens."""

    # Ignored: they do not change the output.
    user: str | None = None
    # Default-only (see DEFAULT_ONLY).
    n: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None

    def unsupported_field(self) -> str | None:
        """The first default-only field set to a value we do not support, else None."""
        for name, allowed in self.DEFAULT_ONLY.items():
            value = getattr(self, name)
            # `== ok` alone would take `true` for 1 and `0` for false.
            if not any(value == ok and isinstance(value, bool) == isinstance(ok, bool)
                       for ok in allowed):
                return name
        return None

    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple, whether the client sent one string or a list."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        """Whether a streaming response ends with a usage chunk."""
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class CompletionRequest(BaseRequest):
    """Body of POST /v1/completions."""

    DEFAULT_ONLY: ClassVar[dict[str, tuple[Any, ...]]] = {
        **BaseRequest.DEFAULT_ONLY,
        "echo": (None, False),
        "best_of": (None, 1),
        "suffix": (None, ""),
    }

    prompt: Prompt
    """One prompt: text, or token ids; a list holding one of those is accepted too."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Number of top alternatives per token; 0 returns only the sampled token's logprob."""
    echo: Any = None
    best_of: Any = None
    suffix: Any = None


class ChatCompletionRequest(BaseRequest):
    """Body of POST /v1/chat/completions."""

    DEFAULT_ONLY: ClassVar[dict[str, tuple[Any, ...]]] = {
        **BaseRequest.DEFAULT_ONLY,
        "tools": (None, []),
        "tool_choice": (None, "none", "auto"),
        "functions": (None, []),
        "function_call": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
        "reasoning_effort": (None,),
        "web_search_options": (None,),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are set."""
    logprobs: bool | None = False
    """Return the log-probability of each generated token."""
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Number of top alternatives per token; needs `logprobs: true`."""

    # Ignored: they do not change the output.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Default-only (see DEFAULT_ONLY).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
