"""An instance flips role under load, on real engines: `shuffleinfer serve` with two
prefill and one decode instance. prefill-0 flips to decode while idle (at once); then,
while eight greedy requests stream, decode-0 (holding some of their decodes) flips to
prefill: it drains, changes role without an engine restart, and every request completes
with the same text as before any flip: none lost, cut or duplicated. Finally every decode
runs on prefill-0 and prefills on prefill-1 and the former decode-0.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from shuffleinfer.config import DEFAULT_MODEL_NAME
from tests.serve_process import running_serve

pytestmark = pytest.mark.engine

ADMIN = "flip-test-admin-token"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
MAX_TOKENS = 24
PROMPTS = [f"Write a short note about {topic}." for topic in (
    "rivers", "bread", "trains", "owls", "glass", "tides", "maps", "bees")]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Eager engines (no torch.compile) start about a minute sooner each on 2 cores; the
    # compiled path is what tests/integration serves.
    args = ["--num-prefill", "2", "--num-decode", "1", "--chunk-size", "256",
            "--max-model-len", "1024", "--kv-cache-gib", "1", "--flip-policy", "never",
            "--admin-token", ADMIN, "--engine-arg", "enforce_eager=true"]
    with running_serve(args, tmp_path_factory.mktemp("flip") / "serve.log") as base:
        yield base


def body(prompt: str, stream: bool) -> dict:
    return {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}


class Progress:
    """Counts streamed chunks over all requests; `midway` is set after `threshold`."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.chunks = 0
        self.midway = asyncio.Event()

    def chunk(self) -> None:
        self.chunks += 1
        if self.chunks >= self.threshold:
            self.midway.set()


async def stream_text(client: httpx.AsyncClient, prompt: str,
                      progress: Progress) -> tuple[str, str | None, int]:
    """(text, finish reason, completion tokens) of one streamed completion."""
    text, reason, tokens = "", None, 0
    async with client.stream("POST", "/v1/completions", json=body(prompt, True)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            progress.chunk()
            for choice in chunk["choices"]:
                text += choice["text"]
                reason = choice["finish_reason"] or reason
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return text, reason, tokens


def instances(client: httpx.Client) -> dict[str, dict]:
    r = client.get("/admin/instances", headers=HEADERS)
    assert r.status_code == 200, r.text
    return {x["instance_id"]: x for x in r.json()["data"]}


def wait_for(client: httpx.Client, instance_id: str, role: str, state: str,
             timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while (x := instances(client)[instance_id])["role"] != role or x["state"] != state:
        assert time.monotonic() < deadline, f"{instance_id} still {x}"
        time.sleep(0.2)


async def wave(base: str, midway: Callable[[], None] | None = None
               ) -> list[tuple[str, str | None, int]]:
    """Stream every prompt at once; call `midway` (in a thread) once a quarter of all
    tokens have arrived, when decodes run on every decode instance."""
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        progress = Progress(len(PROMPTS) * MAX_TOKENS // 4)
        tasks = [asyncio.create_task(stream_text(client, p, progress)) for p in PROMPTS]
        if midway is not None:
            await progress.midway.wait()
            await asyncio.to_thread(midway)
        return list(await asyncio.gather(*tasks))


def test_flip_under_load_loses_and_duplicates_nothing(url: str) -> None:
    with httpx.Client(base_url=url, timeout=300) as client:
        reference = [client.post("/v1/completions", json=body(p, False)).json()
                     ["choices"][0]["text"] for p in PROMPTS]
        r = client.post("/admin/instances/prefill-0/flip", headers=HEADERS)
        assert r.status_code == 200 and r.json()["role"] == "decode", r.text  # it was idle
        # prefill-1 is now the last prefill instance.
        r = client.post("/admin/instances/prefill-1/flip", headers=HEADERS)
        assert r.status_code == 409 and "last prefill instance" in r.json()["error"]["message"]

        flips: list[int] = []

        def flip_decode_0() -> None:
            flips.append(client.post("/admin/instances/decode-0/flip",
                                     headers=HEADERS).status_code)

        results = asyncio.run(wave(url, flip_decode_0))
        assert flips == [202], "decode-0 held no decode when it was asked to flip"
        assert [r[0] for r in results] == reference
        assert {(r[1], r[2]) for r in results} == {("length", MAX_TOKENS)}
        wait_for(client, "decode-0", "prefill", "active")

        # prefill-0 is the only decode instance now: the flipped engine decodes it all.
        r = client.post("/admin/instances/prefill-0/drain", headers=HEADERS)
        assert r.status_code == 409 and "last decode instance" in r.json()["error"]["message"]
        results = asyncio.run(wave(url))
        assert [r[0] for r in results] == reference
        assert {(r[1], r[2]) for r in results} == {("length", MAX_TOKENS)}
        health = client.get("/health").json()
        roles = {x["instance_id"]: (x["role"], x["state"]) for x in health["instances"]}
        assert roles == {"prefill-0": ("decode", "active"), "prefill-1": ("prefill", "active"),
                         "decode-0": ("prefill", "active")}
        metrics = client.get("/metrics").text
        assert 'shuffleinfer_admin_actions_total{action="flip",outcome="ok"} 2.0' in metrics
