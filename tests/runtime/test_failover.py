"""Instances die under load, on real engines: `shuffleinfer serve` with two prefill and two
decode instances that Ray restarts once (`--max-restarts 1`).

1. A prefill instance is killed (SIGKILL of its process) while greedy requests queue and
   prefill on it: they are prefilled again on the other and complete with the text they
   would have had.
2. A decode instance is killed while greedy streams decode on it: each stream goes on
   from the tokens it already had (prompt + those tokens prefilled again, decoded on the
   other instance) with the same text: nothing lost, nothing duplicated.
3. /health says degraded while the dead instances are down, ok once Ray has restarted
   them and their engines rejoined; every failover is counted by leg.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from shuffleinfer.config import DEFAULT_MODEL_NAME
from tests.serve_process import running_serve

pytestmark = pytest.mark.engine

MAX_TOKENS = 48
# About 800 tokens each: seven chunks of prefill; twelve of them queue several seconds of
# prefill on each instance.
PROMPTS = [f"Write a long, detailed report about {topic}. " * 90 for topic in (
    "rivers", "bread", "trains", "owls", "glass", "tides", "maps", "bees", "clouds",
    "salt", "wool", "ink")]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Eager engines (no torch.compile) start about a minute sooner each on 2 cores; the
    # compiled path is what tests/integration serves.
    args = ["--num-prefill", "2", "--num-decode", "2", "--chunk-size", "128",
            "--max-model-len", "1024", "--kv-cache-gib", "1", "--flip-policy", "never",
            "--max-restarts", "1", "--engine-arg", "enforce_eager=true"]
    with running_serve(args, tmp_path_factory.mktemp("failover") / "serve.log") as base:
        yield base


def body(prompt: str, stream: bool) -> dict:
    return {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def health(base: str) -> dict:
    return httpx.get(f"{base}/health", timeout=30).json()


def pids(base: str) -> dict[str, int]:
    """Each instance's process (asked before the load: /health answers slowly under it,
    four engines sharing two cores)."""
    return {x["instance_id"]: x["pid"] for x in health(base)["instances"]}


def failovers(base: str, leg: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(f'shuffleinfer_failovers_total{{leg="{leg}"}}'):
            return float(line.rpartition(" ")[2])
    return 0.0


async def stream(client: httpx.AsyncClient, prompt: str, arrivals: list[float]
                 ) -> tuple[str, str | None, int]:
    """(text, finish reason, chunks) of one streamed completion; each chunk's arrival
    time goes to `arrivals` (for the longest stall)."""
    text, reason, chunks = "", None, 0
    async with client.stream("POST", "/v1/completions", json=body(prompt, True)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunks += 1
            arrivals.append(time.monotonic())
            for choice in json.loads(line[6:])["choices"]:
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    return text, reason, chunks


async def drill(base: str, victim_pid: int, when: str) -> tuple[list[tuple], float, str]:
    """Stream every prompt at once; kill the process `victim_pid` once the prompts are
    queued (when="queued") or once three streams are decoding at once (when="decoding":
    in a slow spell the first streams end before the last prefill ends). Returns
    the streams' results, the longest gap between two chunks of a stream after the kill,
    and what /health said just after it."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        arrivals: list[list[float]] = [[] for _ in PROMPTS]
        tasks = [asyncio.create_task(stream(client, p, a))
                 for p, a in zip(PROMPTS, arrivals, strict=True)]
        if when == "queued":  # placed and queued on both prefill instances by then
            await asyncio.sleep(1.5)
        else:  # three streams decoding at once are on both decode instances (least load)
            while not (sum(len(a) >= 4 and not t.done() for a, t in zip(arrivals, tasks,
                                                                         strict=True)) >= 3
                       or all(len(a) >= 4 for a in arrivals)):
                await asyncio.sleep(0.05)
        killed_at = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        status = (await client.get("/health")).json()["status"]
        results = await asyncio.gather(*tasks)
        stall = max(max((b - a for a, b in zip(times, times[1:], strict=False) if b > killed_at),
                        default=0.0) for times in arrivals)
        return results, stall, status


def test_requests_survive_a_prefill_and_a_decode_instance_dying(url: str) -> None:
    async def texts() -> list[str]:  # all at once: both prefill instances busy
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            replies = await asyncio.gather(*(client.post("/v1/completions",
                                                         json=body(p, False)) for p in PROMPTS))
        return [r.json()["choices"][0]["text"] for r in replies]

    reference = asyncio.run(texts())

    results, stall, status = asyncio.run(drill(url, pids(url)["prefill-0"], "queued"))
    assert [r[0] for r in results] == reference
    assert {r[1] for r in results} == {"length"}
    assert status == "degraded"
    assert failovers(url, "prefill") >= 1
    print(f"prefill-0 killed: {len(PROMPTS)} in flight, all completed, longest stall "
          f"{stall:.1f} s")

    # Decodes are placed by least load: about half of the streams decode on decode-0.
    results, stall, status = asyncio.run(drill(url, pids(url)["decode-0"], "decoding"))
    assert [r[0] for r in results] == reference  # no token lost or repeated
    assert {r[1] for r in results} == {"length"}
    assert status == "degraded"
    assert failovers(url, "decode") >= 1
    print(f"decode-0 killed: {len(PROMPTS)} in flight, all completed, longest stall "
          f"{stall:.1f} s")

    deadline = time.monotonic() + 300  # Ray restarts both; their engines start again
    while (report := health(url))["status"] != "ok":
        assert report["status"] == "degraded", report
        assert time.monotonic() < deadline, report
        time.sleep(1)
    assert all(x["ready"] for x in report["instances"])
    assert [r.json()["choices"][0]["text"] for r in (
        httpx.post(f"{url}/v1/completions", json=body(p, False), timeout=600)
        for p in PROMPTS[:2])] == reference[:2]  # the rejoined instances serve again
