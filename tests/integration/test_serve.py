"""End-to-end behaviour of a real disaggregated deployment (see conftest.server)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from benchmarks.soak import instances, wait_idle
from tests.integration.conftest import (
    CHUNK_SIZE,
    MAX_MODEL_LEN,
    MAX_NUM_REQUESTS,
    metric_values,
    real_chat_prompts,
)
from tests.serve_process import stop_group

pytestmark = pytest.mark.engine

MAX_TOKENS = 32
BUCKETS = [(20, 40), (40, 80), (80, 160), (160, 250), (250, 400), (400, 600), (600, 800),
           (800, 1000), (1000, 1250), (1250, 1500)]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:  # noqa: ANN001
    short = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    return [short] + real_chat_prompts(tokenizer, BUCKETS)


@pytest.fixture(scope="module")
def reference_run(model_path: str, prompts: list[list[int]],
                  tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """One colocated stock vLLM engine (float32, like the server) making the greedy
    outputs, started before the server fixture so both start up at once. It runs eager:
    the server's two engines compile (the default path), and a third compile beside
    them shares the same two cores (this module's set-up took 256 s in one CI-like run,
    379 s in the last CI with a compiled reference); the outputs match either way."""
    tmp = tmp_path_factory.mktemp("reference")
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    script = Path(__file__).with_name("colocated_reference.py")
    with open(tmp / "reference.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), model_path,
                                 str(tmp / "prompts.json"), str(tmp / "out.json"),
                                 "--max-tokens", str(MAX_TOKENS),
                                 "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32",
                                 "--enforce-eager"],
                                cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                                env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"},
                                start_new_session=True)
    try:
        yield proc, tmp
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def reference(reference_run: tuple[subprocess.Popen[bytes], Path], server: str) -> list[dict]:
    """The reference's greedy outputs (waited for once the server is up)."""
    proc, tmp = reference_run
    if proc.wait(timeout=900) != 0:
        pytest.fail(f"colocated reference exited with {proc.returncode}:\n"
                    f"{(tmp / 'reference.log').read_text()[-4000:]}")
    return json.loads((tmp / "out.json").read_text())


def test_greedy_output_equals_colocated_vllm(reference: list[dict], server: str,
                                             prompts: list[list[int]]) -> None:
    lengths = [len(p) for p in prompts]
    assert min(lengths) <= 5 and max(lengths) >= 1250
    assert sum(n > CHUNK_SIZE for n in lengths) >= 4, "several prompts must span chunks"
    before = metric_values(server, "shuffleinfer_kv_transfers_total")
    overlapped_before = metric_values(server, "shuffleinfer_kv_overlapped_blocks_total")
    mismatches = []
    for ids, ref in zip(prompts, reference, strict=True):
        r = httpx.post(f"{server}/v1/completions", timeout=120, json={
            "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        got = body["choices"][0]["text"]
        if got != ref["text"] or body["usage"]["completion_tokens"] != len(ref["token_ids"]):
            mismatches.append((len(ids), ref["text"], got))
        assert body["usage"]["prompt_tokens"] == len(ids)
    assert not mismatches, f"disaggregated output differs from colocated vLLM: {mismatches}"
    after = metric_values(server, "shuffleinfer_kv_transfers_total")
    shm = '{transport="shm"}'  # both engines on one host: auto picks shared memory
    assert after.get(shm, 0) - before.get(shm, 0) >= len(prompts) - 1  # some end at token 1
    assert set(after) == {shm}, after
    # Overlap mode (the default): the long prompts' early chunks were staged while the
    # later ones computed (a 1250-token prompt alone completes 9 blocks before its last).
    overlapped = metric_values(server, "shuffleinfer_kv_overlapped_blocks_total")
    assert overlapped.get("", 0) - overlapped_before.get("", 0) >= 9, overlapped


def test_openai_client_chat_stream_and_non_stream(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                           max_tokens=24, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=24, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_concurrent_requests_use_both_roles(server: str) -> None:
    prefilled = metric_values(server, "shuffleinfer_requests_prefilled_total")
    decoded = metric_values(server, "shuffleinfer_requests_decoded_total")

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "prompt": f"Request {i}: write a short poem about the number {i}.",
                "max_tokens": 16, "ignore_eos": True, "temperature": 0.7, "seed": i})
                for i in range(16)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 16
    assert all(r.json()["usage"]["completion_tokens"] == 16 for r in responses)
    prefilled_after = metric_values(server, "shuffleinfer_requests_prefilled_total")
    decoded_after = metric_values(server, "shuffleinfer_requests_decoded_total")
    assert all('instance="prefill-' in k for k in prefilled_after)
    assert all('instance="decode-' in k for k in decoded_after)
    assert sum(prefilled_after.values()) - sum(prefilled.values()) == 16
    assert sum(decoded_after.values()) - sum(decoded.values()) == 16


def test_output_lengths_are_predicted_beside_the_prefill_and_learned(server: str) -> None:
    def totals() -> dict[str, float]:
        outcomes = metric_values(server, "shuffleinfer_predictions_total")
        return {"on_time": outcomes.get('{outcome="on_time"}', 0.0),
                "late": outcomes.get('{outcome="late"}', 0.0),
                "scored": sum(metric_values(server, "shuffleinfer_prediction_scored_total")
                              .values()),
                "version": sum(metric_values(server, "shuffleinfer_predictor_version")
                               .values())}

    before = totals()
    for i in range(6):
        response = httpx.post(f"{server}/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": f"List {i + 2} colours."}],
            "max_tokens": 24, "temperature": 0})
        assert response.status_code == 200
    after = totals()
    # Every request got a prediction made beside its prefill, in time (a prefill takes
    # about 100 ms here, a prediction well under 1 ms) ...
    assert after["on_time"] - before["on_time"] == 6
    assert after["late"] == before["late"]
    # ... was scored against its true length, and taught the cluster's learner.
    assert after["scored"] - before["scored"] == 6
    assert after["version"] - before["version"] >= 6


@pytest.mark.parametrize(("body", "status", "needle"), [
    ('{"prompt": "hi", "max_tokens": ', 400, "JSON"),
    ('{"prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
    ('{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    ('{"prompt": "hi", "max_tokens": -5}', 400, "max_tokens"),
    ('{"model": "gpt-4", "prompt": "hi"}', 404, "gpt-4"),
    ('{"prompt": "hi", "frobnicate": 1}', 400, "frobnicate"),
    (json.dumps({"prompt": "hello " * (MAX_MODEL_LEN + 10), "max_tokens": 4}), 400,
     "maximum context length"),
])
def test_bad_input_gets_openai_error(server: str, body: str, status: int, needle: str) -> None:
    r = httpx.post(f"{server}/v1/completions", content=body, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle.lower() in error["message"].lower()
    assert error["type"]


def test_the_http_server_listens_on_loopback_only_by_default(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    listening = {c.laddr.ip for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{address}:{port}/health", timeout=5)


def test_a_burst_past_the_limit_gets_429_and_the_held_requests_finish(server: str) -> None:
    burst = MAX_NUM_REQUESTS + 8

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "prompt": f"Count to {i}:", "max_tokens": 8, "ignore_eos": True})
                for i in range(burst)))

    responses = asyncio.run(run())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == burst, [r.status_code for r in responses]
    assert len(ok) >= MAX_NUM_REQUESTS and refused
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in ok)
    assert all(r.headers["retry-after"] == "2" and
               r.json()["error"]["type"] == "rate_limit_error" for r in refused)
    assert metric_values(server, "shuffleinfer_requests_held") == {"": 0.0}


def test_client_disconnect_aborts_both_legs_and_frees_kv(server: str) -> None:
    body = {"prompt": "Tell me everything about the history of Rome. " * 20,
            "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        busy = instances(server)
        assert any(i["role"] == "decode" and i["num_running_reqs"] >= 1
                   and i["kv_cache_usage"] > 0 for i in busy), busy
    loads = wait_idle(server, 15, poll_s=0.5)
    assert all(i["num_running_reqs"] == 0 for i in loads), loads
    assert all(i["kv_cache_usage"] == 0 for i in loads), loads


def _settled_free_kv(server: str) -> tuple[dict[str, int], list[dict]]:
    """Each instance's free KV tokens once idle, read after one small request has made
    both engines step (an engine reports its KV use after a step, so an idle engine's
    last report can predate the aborts that freed its blocks)."""
    reply = httpx.post(f"{server}/v1/completions", json={
        "prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "temperature": 0}, timeout=120)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    loads = wait_idle(server, 60, poll_s=0.5)
    return {i["instance_id"]: i["num_free_kv_tokens"] for i in loads}, loads


def test_a_thousand_aborted_requests_leave_every_instance_s_kv_as_it_was(
        server: str) -> None:
    before, _ = _settled_free_kv(server)
    tokens_seen: dict[int, int] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        # Gone at a random moment (queued, prefilling, handing over or decoding), or
        # after reading a few tokens; none could finish in time (200 tokens to make).
        rng = random.Random(i)
        body = {"prompt": f"{i}. " + "Tell me about the history of Rome. " * rng.randint(1, 20),
                "max_tokens": 200, "ignore_eos": True, "stream": True}
        read_up_to, give_up_s = rng.randint(1, 8), rng.uniform(0.05, 3.0)
        tokens_seen[i] = 0

        async def read() -> bool:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code == 429:  # slots of those just gone are not all back yet
                    return False
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    tokens_seen[i] += line.startswith("data: {")
                    if tokens_seen[i] >= read_up_to:
                        break
            return True

        while True:
            try:
                if await asyncio.wait_for(read(), give_up_s):
                    return
            except TimeoutError:
                return
            await asyncio.sleep(1)  # refused: send it again, so 1,000 do go away

    async def run() -> None:
        # 20 at a time, under the server's limit of held requests: each of 20 senders
        # takes the next of the 1,000 as soon as its last one has gone.
        numbers = iter(range(1000))

        async def sender(client: httpx.AsyncClient) -> None:
            for i in numbers:
                await one(client, i)

        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            await asyncio.gather(*(sender(client) for _ in range(20)))

    asyncio.run(run())
    got = sorted(tokens_seen.values())
    assert len(got) == 1000 and got[0] == 0 and got[-1] >= 1, got  # gone before and after
    # Nothing abandoned is run: prompts and decodes still waiting their turn leave with
    # their clients (before, hundreds of gone prompts were still prefilled, for minutes).
    deadline = time.monotonic() + 30
    while (busy := [i for i in instances(server) if i["num_running_reqs"]]) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not busy, busy
    after, loads = _settled_free_kv(server)  # (the cluster still serves, too)
    assert after == before, loads
    assert all(i["num_running_reqs"] == 0 and i["num_waiting_reqs"] == 0 for i in loads)


@pytest.mark.parametrize(("stop", "content"), [
    ("The capital", ""),      # starts in the first token (prefill), ends in the decode leg
    ("e cap", "Th"),          # straddles inside the words
    (" Paris", "The capital of France is"),  # wholly inside the decode leg (vLLM's own check)
])
def test_stop_string_across_the_prefill_decode_boundary(server: str, stop: str,
                                                        content: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24, "temperature": 0, "stop": [stop]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (content, "stop")
