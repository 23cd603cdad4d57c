"""The load generator against real HTTP servers, and prompts sized by the real tokenizer.

The fake servers are FastAPI apps served by uvicorn on free ports, built to answer
after a known time to first token and inter-token latency; the tests check that the
client measures exactly those, sends on time whatever the server does, and records
failures without stopping. Prompt tests use the default model's tokenizer and the
real prompt data.
"""

from __future__ import annotations

import socket
import statistics
from pathlib import Path
from typing import Any

import pytest
from fake_openai import ITL_S, TTFT_S, FakeServer, serving

from benchmarks.client import run, run_requests
from benchmarks.prompts import PromptBuilder
from benchmarks.records import TraceRequest
from shuffleinfer.model import DEFAULT_MODEL

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _closed_port_url() -> str:
    """A URL nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder.from_data(DEFAULT_MODEL, DATA_DIR)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from shuffleinfer.model import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))


def _requests(output_tokens: list[int], prompt_tokens: int = 32) -> list[TraceRequest]:
    return [TraceRequest(arrival_s=0.0, prompt_tokens=prompt_tokens, output_tokens=n)
            for n in output_tokens]


# --- the client ----------------------------------------------------------------------


def test_replay_measures_what_the_server_does_and_sends_on_time(
    builder: PromptBuilder, tokenizer: Any
) -> None:
    server = FakeServer()
    # Request 0 streams for ~1.2 s while the next nine arrive: an open-loop client sends
    # them on time anyway.
    outputs = [20, 5, 6, 7, 8, 5, 6, 7, 8, 5]
    arrivals = [0.1 * i for i in range(len(outputs))]
    requests = _requests(outputs, prompt_tokens=100)
    with serving(server) as url:
        records = run(requests, arrivals, endpoints=[url + "/"], model="m", builder=builder,
                      progress=False)

    assert [r.index for r in records] == list(range(len(outputs)))
    assert all(r.ok and r.error is None for r in records), [r.error for r in records]
    for record, asked in zip(records, outputs, strict=True):
        assert record.endpoint == url
        assert record.output_tokens == asked == record.max_tokens
        assert len(record.token_times_s) == asked
        assert record.ttft_s == pytest.approx(TTFT_S, abs=0.03)
        assert statistics.mean(record.itl_s) == pytest.approx(ITL_S, rel=0.15)
        assert abs(record.sent_at_s - record.scheduled_at_s) < 0.03  # type: ignore[operator]
    assert records[0].finished_at_s > records[9].sent_at_s  # type: ignore[operator]

    # The server saw them arrive on the same schedule, with the body vLLM needs.
    seen = sorted(server.received, key=lambda item: item[0])
    for (at, body), arrival, req in zip(seen, arrivals, requests, strict=True):
        assert at - seen[0][0] == pytest.approx(arrival, abs=0.03)
        assert body["max_tokens"] == body["min_tokens"] == req.output_tokens
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["temperature"] == 0 and body["model"] == "m"
        assert body["stream_options"] == {"include_usage": True}
        assert len(tokenizer.encode(body["prompt"])) == 100
    assert len({body["prompt"] for _, body in seen}) == len(outputs)


def test_hundreds_in_flight_are_all_sent_before_any_answer(builder: PromptBuilder) -> None:
    # More requests than httpx's default pool (100 connections) hold, all answered late.
    server = FakeServer(ttft_s=2.0, itl_s=0.01)
    with serving(server) as url:
        records = run(_requests([2] * 200, prompt_tokens=8), [0.001 * i for i in range(200)],
                      endpoints=[url], model="m", builder=builder, progress=False)
    assert all(r.ok for r in records), {r.error for r in records}
    # A client that capped its connections would hold some back until others finished.
    received = [at for at, _ in server.received]
    assert len(received) == 200
    assert max(received) < min(received) + server.ttft_s


def test_http_errors_and_refused_connections_are_failures_that_do_not_stop_the_run(
    builder: PromptBuilder,
) -> None:
    server = FakeServer(ttft_s=0.05, itl_s=0.01, status_by_max_tokens={3: 400, 4: 500})
    outputs = [2, 3, 4, 5, 2, 2]
    with serving(server) as url:
        # Requests go round robin: even ones to the live server, odd ones nowhere.
        endpoints = [url, _closed_port_url()]
        records = run(_requests([2, 6, 2, 6]), [0.0, 0.0, 0.05, 0.05], endpoints=endpoints,
                      model="m", builder=builder, progress=False)
        statuses = run(_requests(outputs), [0.02 * i for i in range(len(outputs))],
                       endpoints=[url], model="m", builder=builder, progress=False)

    assert [r.ok for r in records] == [True, False, True, False]
    assert [r.endpoint for r in records] == endpoints * 2
    for refused in records[1::2]:
        assert refused.error is not None and "Connect" in refused.error
        assert refused.output_tokens == 0 and refused.first_token_at_s is None
    assert [r.ok for r in statuses] == [True, False, False, True, True, True]
    assert statuses[1].error is not None and statuses[1].error.startswith("HTTP 400")
    assert statuses[2].error is not None and statuses[2].error.startswith("HTTP 500")
    assert "forced status 500" in statuses[2].error
    assert [r.output_tokens for r in statuses] == [2, 0, 0, 5, 2, 2]


def test_round_robin_over_two_servers_and_tokens_counted_without_usage(
    builder: PromptBuilder,
) -> None:
    with_usage, without_usage = FakeServer(ttft_s=0.02, itl_s=0.01), FakeServer(
        ttft_s=0.02, itl_s=0.01, send_usage=False)
    outputs = [2, 3, 4, 5, 6, 7]
    with serving(with_usage) as first, serving(without_usage) as second:
        records = run(_requests(outputs), [0.01 * i for i in range(len(outputs))],
                      endpoints=[first, second], model="m", builder=builder, progress=False)

    assert [r.endpoint for r in records] == [first, second] * 3
    assert sorted(body["max_tokens"] for _, body in with_usage.received) == [2, 4, 6]
    assert sorted(body["max_tokens"] for _, body in without_usage.received) == [3, 5, 7]
    assert all(r.ok for r in records)
    assert [r.output_tokens for r in records] == outputs


async def test_timeout_is_a_failure_of_that_request(builder: PromptBuilder) -> None:
    with serving(FakeServer(ttft_s=1.0)) as url:
        records = await run_requests(_requests([3]), [0.0], endpoints=[url], model="m",
                                     builder=builder, timeout_s=0.2, progress=False)
    assert not records[0].ok
    assert records[0].error is not None and "Timed out" in records[0].error
    assert records[0].e2e_s == pytest.approx(0.2, abs=0.1)


@pytest.mark.parametrize(("arrivals", "endpoints", "message"), [
    ([0.0, 1.0], ["http://127.0.0.1:1"], "one arrival time per request"),
    ([-1.0], ["http://127.0.0.1:1"], r"arrivals_s\[0\] = -1.0"),
    ([0.0], [], "endpoints is empty"),
    ([0.0], ["127.0.0.1:8000"], "'127.0.0.1:8000'"),
])
def test_bad_arguments_are_refused_before_sending(
    builder: PromptBuilder, arrivals: list[float], endpoints: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run(_requests([1]), arrivals, endpoints=endpoints, model="m", builder=builder,
            progress=False)


# --- the prompt builder --------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, 128, 1000, 4000])
def test_prompts_have_exactly_the_asked_token_count(
    builder: PromptBuilder, tokenizer: Any, size: int
) -> None:
    for index in range(8):
        prompt = builder.build(TraceRequest(0.0, size, 1), index)
        assert prompt.num_tokens == size
        assert len(tokenizer.encode(prompt.text)) == size, (index, prompt.text[-80:])


def test_different_requests_share_no_prefix_cache_block(
    builder: PromptBuilder, tokenizer: Any
) -> None:
    texts = [builder.build(TraceRequest(0.0, 64, 1), i).text for i in range(200)]
    # vLLM caches prefixes in 16-token blocks: no two prompts may share the first one.
    first_blocks = {tuple(tokenizer.encode(text)[:16]) for text in texts}
    assert len(first_blocks) == len(texts)
    assert builder.build(TraceRequest(0.0, 64, 1), 7).text == texts[7]  # repeatable


def test_equal_block_ids_give_equal_token_prefixes(
    builder: PromptBuilder, tokenizer: Any
) -> None:
    def tokens(ids: tuple[int, ...], size: int, index: int) -> list[int]:
        prompt = builder.build(TraceRequest(0.0, size, 1, ids, block_tokens=128), index)
        assert prompt.num_tokens == size
        return list(tokenizer.encode(prompt.text))

    a = tokens((1, 2, 3), 330, 0)
    b = tokens((1, 2, 9), 380, 1)
    c = tokens((1, 7), 256, 2)
    d = tokens((5,), 128, 3)
    e = tokens((1, 2, 3), 330, 4)
    assert a[:256] == b[:256]
    assert a[256:300] != b[256:300]
    assert a[:128] == c[:128]
    assert a[128:256] != c[128:256]
    assert a[:16] != d[:16]
    assert a == e  # same hash ids and length: the same prompt, as in Mooncake
    assert tokens((3, 1), 256, 5)[128:] == a[:128]  # a block's text does not move with it


def test_requests_the_tokenizer_cannot_fit_are_refused(builder: PromptBuilder) -> None:
    with pytest.raises(ValueError, match="Request 3"):
        builder.build(TraceRequest(0.0, 0, 1), 3)
    with pytest.raises(ValueError, match="block_tokens=4"):
        builder.build(TraceRequest(0.0, 40, 1, (1, 2), block_tokens=4), 0)
    with pytest.raises(FileNotFoundError, match="mixed_tasks"):
        PromptBuilder.from_data(DEFAULT_MODEL, DATA_DIR / "missing")
