"""OpenAI response objects built from `TokenDelta`s.

One formatter per request shapes both the streamed chunks and the non-streamed response,
so the two can never disagree: `CompletionFormatter` makes `text_completion` objects,
`ChatFormatter` makes `chat.completion` and `chat.completion.chunk` objects.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from shuffleinfer.protocol import TokenDelta, TokenLogprob


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    """OpenAI's `usage` object."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def chat_logprob_entries(logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Entries of a chat `logprobs.content` list."""
    return [
        {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
         "top_logprobs": [{"token": token, "logprob": logprob, "bytes": list(token.encode())}
                          for token, logprob in lp.top]}
        for lp in logprobs
    ]


class Formatter(ABC):
    """What both formatters share: ids, chunk envelope and the usage chunk."""

    chunk_object: str = ""

    def __init__(self, req_id: str, model: str, *, logprobs: bool, include_usage: bool,
                 created: int | None = None) -> None:
        self.req_id = req_id
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A response or chunk object around `choices`."""
        return {"id": self.req_id, "object": obj, "created": self.created,
                "model": self.model, "choices": choices}

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        """One streamed chunk; with include_usage every chunk carries `usage: null`."""
        body = self.envelope(self.chunk_object, [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, Any]:
        """The last chunk of a stream with include_usage: empty choices, usage set."""
        body = self.envelope(self.chunk_object, [])
        body["usage"] = usage(num_prompt_tokens, num_completion_tokens)
        return body

    @abstractmethod
    def chunks(self, delta: TokenDelta) -> list[dict[str, Any]]:
        """The chunks to stream for one delta (possibly none)."""

    @abstractmethod
    def response(self, deltas: Sequence[TokenDelta], num_prompt_tokens: int) -> dict[str, Any]:
        """The non-streamed response for the whole output."""


class CompletionFormatter(Formatter):
    """Shapes /v1/completions output (`text_completion` objects)."""

    chunk_object = "text_completion"

    def __init__(self, req_id: str, model: str, *, logprobs: bool, include_usage: bool,
                 created: int | None = None) -> None:
        super().__init__(req_id, model, logprobs=logprobs, include_usage=include_usage,
                         created=created)
        self._num_chars = 0
        """Length of the text streamed so far: where the next token's text_offset starts."""

    def _logprobs(self, deltas: Sequence[TokenDelta]) -> dict[str, Any] | None:
        """OpenAI's completions logprobs object; advances the text offset."""
        if not self.logprobs:
            return None
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
        text_offset: list[int] = []
        for delta in deltas:
            offset = self._num_chars
            for lp in delta.logprobs or ():
                tokens.append(lp.token)
                token_logprobs.append(lp.logprob)
                top_logprobs.append(dict(lp.top))
                text_offset.append(offset)
                offset += len(lp.token)
            self._num_chars += len(delta.text)
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": text_offset}

    def chunks(self, delta: TokenDelta) -> list[dict[str, Any]]:
        """One chunk per delta that has tokens, text or a finish reason."""
        if not (delta.token_ids or delta.text or delta.finish_reason):
            return []
        return [self.chunk({"index": 0, "text": delta.text,
                            "logprobs": self._logprobs([delta]),
                            "finish_reason": delta.finish_reason})]

    def response(self, deltas: Sequence[TokenDelta], num_prompt_tokens: int) -> dict[str, Any]:
        """The `text_completion` response with the whole text and usage."""
        choice = {"index": 0, "text": "".join(d.text for d in deltas),
                  "logprobs": self._logprobs(deltas),
                  "finish_reason": deltas[-1].finish_reason if deltas else None}
        body = self.envelope("text_completion", [choice])
        body["usage"] = usage(num_prompt_tokens, sum(len(d.token_ids) for d in deltas))
        return body


class ChatFormatter(Formatter):
    """Shapes /v1/chat/completions output; the first chunk announces the assistant role."""

    chunk_object = "chat.completion.chunk"

    def __init__(self, req_id: str, model: str, *, logprobs: bool, include_usage: bool,
                 created: int | None = None) -> None:
        super().__init__(req_id, model, logprobs=logprobs, include_usage=include_usage,
                         created=created)
        self._sent_role = False

    def chunks(self, delta: TokenDelta) -> list[dict[str, Any]]:
        """A role chunk before the first content, then one chunk per non-empty delta."""
        out: list[dict[str, Any]] = []
        if not self._sent_role:
            out.append(self.chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}))
            self._sent_role = True
        if delta.token_ids or delta.text or delta.finish_reason:
            logprobs = ({"content": chat_logprob_entries(delta.logprobs or ()), "refusal": None}
                        if self.logprobs else None)
            content = {"content": delta.text} if delta.text or not delta.finish_reason else {}
            out.append(self.chunk({"index": 0, "delta": content, "logprobs": logprobs,
                                   "finish_reason": delta.finish_reason}))
        return out

    def response(self, deltas: Sequence[TokenDelta], num_prompt_tokens: int) -> dict[str, Any]:
        """The `chat.completion` response with the whole message and usage."""
        logprobs = None
        if self.logprobs:
            entries = [lp for d in deltas for lp in d.logprobs or ()]
            logprobs = {"content": chat_logprob_entries(entries), "refusal": None}
        choice = {"index": 0,
                  "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
                  "logprobs": logprobs,
                  "finish_reason": deltas[-1].finish_reason if deltas else None}
        body = self.envelope("chat.completion", [choice])
        body["usage"] = usage(num_prompt_tokens, sum(len(d.token_ids) for d in deltas))
        return body
