"""Open-loop load generator: replays requests against OpenAI-compatible /v1/completions.

The life of one request in a run:

1. Before the clock starts, its prompt is built (tokenising during the run would delay
   sends) and its endpoint is chosen: round robin over the endpoints in request order.
2. A dispatcher sleeps until the request's arrival time (seconds after the run started,
   on `time.perf_counter`) and starts an asyncio task for it. It never waits for
   responses: the load is open loop, a slow server does not slow the arrivals down.
3. The task POSTs a streaming completion that must produce exactly `output_tokens`
   tokens (`ignore_eos`, `min_tokens`) and records when it was sent, when each chunk
   carrying text arrived (the first is the first token), when the stream ended and the
   server's usage figure.
4. Anything that goes wrong (an HTTP error status, a broken stream, a refused connection,
   the timeout) is written on that request's record; the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
import time
from collections.abc import Sequence
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks.prompts import BuiltPrompt, PromptBuilder
from benchmarks.records import RequestRecord, TraceRequest

logger = logging.getLogger("benchmarks.client")

ERROR_EXCERPT_CHARS = 300
"""How much of an error body a record keeps."""

MAX_KEEPALIVE_CONNECTIONS = 1000
"""Idle connections kept open for reuse; open connections themselves are not limited,
since a connection limit would queue requests in the client and break the open loop."""


class StreamError(Exception):
    """The server's event stream was malformed or reported an error."""


def run(
    requests: list[TraceRequest],
    arrivals_s: list[float],
    *,
    endpoints: list[str],
    model: str,
    builder: PromptBuilder,
    timeout_s: float = 600,
    progress: bool = True,
    api_key: str | None = None,
) -> list[RequestRecord]:
    """`run_requests` for callers without an event loop."""
    return asyncio.run(run_requests(requests, arrivals_s, endpoints=endpoints, model=model,
                                    builder=builder, timeout_s=timeout_s, progress=progress,
                                    api_key=api_key))


async def run_requests(
    requests: list[TraceRequest],
    arrivals_s: list[float],
    *,
    endpoints: list[str],
    model: str,
    builder: PromptBuilder,
    timeout_s: float = 600,
    progress: bool = True,
    api_key: str | None = None,
) -> list[RequestRecord]:
    """Send request `i` at `arrivals_s[i]` seconds after the start; return what was seen.

    `endpoints` are base URLs (``http://host:port``); requests go to them in turn.
    `timeout_s` bounds each request from sending to its last byte. Records come back in
    request order, one per request, failed ones with `ok=False` and an `error`.
    Raises `ValueError` for arguments that do not fit together.
    """
    base_urls = _check_args(requests, arrivals_s, endpoints, timeout_s)
    prompts = [builder.build(req, i)
               for i, req in enumerate(tqdm(requests, desc="building prompts", unit="req",
                                            disable=not progress))]
    records = [
        RequestRecord(index=i, endpoint=base_urls[i % len(base_urls)],
                      scheduled_at_s=arrivals_s[i], prompt_tokens=prompt.num_tokens,
                      max_tokens=req.output_tokens)
        for i, (req, prompt) in enumerate(zip(requests, prompts, strict=True))
    ]
    _allow_open_files(len(requests) + 64)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None,
                          max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s),
                                 headers=headers) as client:
        with tqdm(total=len(requests), desc="requests", unit="req",
                  disable=not progress) as bar:
            start = time.perf_counter()
            tasks: list[asyncio.Task[None]] = []
            try:
                for i in sorted(range(len(requests)), key=arrivals_s.__getitem__):
                    delay = start + arrivals_s[i] - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    body = _body(model, prompts[i], requests[i])
                    tasks.append(asyncio.create_task(
                        _send(client, records[i], body, start, timeout_s, bar)))
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:  # on cancellation (Ctrl-C), stop what is in flight
                    task.cancel()
    return records


def _check_args(
    requests: Sequence[TraceRequest],
    arrivals_s: Sequence[float],
    endpoints: Sequence[str],
    timeout_s: float,
) -> list[str]:
    """Validate the arguments of `run_requests`; return the endpoints without a final /."""
    if len(arrivals_s) != len(requests):
        raise ValueError(f"arrivals_s has {len(arrivals_s)} times for {len(requests)} "
                         "requests; give one arrival time per request.")
    for i, arrival in enumerate(arrivals_s):
        if not math.isfinite(arrival) or arrival < 0:
            raise ValueError(f"arrivals_s[{i}] = {arrival!r}: arrival times must be finite "
                             "and not negative (seconds after the start of the run).")
    if not endpoints:
        raise ValueError("endpoints is empty; give at least one base URL such as "
                         "http://127.0.0.1:8000.")
    for endpoint in endpoints:
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"Endpoint {endpoint!r} is not an http(s) base URL such as "
                             "http://127.0.0.1:8000.")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}.")
    return [endpoint.rstrip("/") for endpoint in endpoints]


def _allow_open_files(num_files: int) -> None:
    """Raise the soft limit on open files towards `num_files`: one socket per request in
    flight, and Linux often starts processes at 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= num_files:
        return
    wanted = num_files if hard == resource.RLIM_INFINITY else min(num_files, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < num_files:
        logger.warning("Only %d files may be open (hard limit); more requests than that in "
                       "flight will fail to connect.", wanted)


def _body(model: str, prompt: BuiltPrompt, req: TraceRequest) -> dict[str, Any]:
    """The /v1/completions body: exactly `output_tokens` greedy tokens, streamed."""
    return {
        "model": model,
        "prompt": prompt.text,
        "max_tokens": req.output_tokens,
        "ignore_eos": True,
        "min_tokens": req.output_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _send(
    client: httpx.AsyncClient,
    record: RequestRecord,
    body: dict[str, Any],
    start: float,
    timeout_s: float,
    bar: tqdm,
) -> None:
    """Send one request and fill in its record; never raises but for cancellation."""
    record.sent_at_s = time.perf_counter() - start
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", f"{record.endpoint}/v1/completions",
                                     json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    record.error = (f"HTTP {response.status_code}: "
                                    f"{text[:ERROR_EXCERPT_CHARS]}")
                    return
                await _read_stream(response, record, start)
    except TimeoutError:
        record.error = f"Timed out after {timeout_s} s"
    except Exception as e:  # any failure belongs to this request only; the run goes on
        record.error = f"{type(e).__name__}: {str(e)[:ERROR_EXCERPT_CHARS] or repr(e)}"
    finally:
        if record.finished_at_s is None:
            record.finished_at_s = time.perf_counter() - start
        bar.update(1)


async def _read_stream(response: httpx.Response, record: RequestRecord, start: float) -> None:
    """Read server-sent events until `data: [DONE]`, noting when text arrived."""
    usage_tokens: int | None = None
    try:
        async for line in response.aiter_lines():
            now = time.perf_counter() - start
            if not line.startswith("data:"):  # blank separators, comments, other fields
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                record.finished_at_s = now
                record.ok = True
                return
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError as e:
                raise StreamError(f"Event data is not JSON: {data[:100]!r}") from e
            if chunk.get("error"):
                raise StreamError(f"Error event: {json.dumps(chunk['error'])}")
            if any(choice.get("text") for choice in chunk.get("choices") or []):
                record.token_times_s.append(now)
                if record.first_token_at_s is None:
                    record.first_token_at_s = now
            usage = chunk.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
        raise StreamError("The stream ended without `data: [DONE]`.")
    finally:
        record.output_tokens = (usage_tokens if usage_tokens is not None
                                else len(record.token_times_s))
