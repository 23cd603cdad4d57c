"""GET /health, GET /v1/models and GET /metrics."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from shuffleinfer.api import create_app
from shuffleinfer.protocol import InstanceLoad, KVTransferStats, PredictionStats, TransportStats

from .conftest import FakeBackend, metric

CHAT = {"messages": [{"role": "user", "content": "Hi!"}]}


async def test_health_is_200_when_ready_and_503_when_not(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert [(i["instance_id"], i["role"], i["ready"]) for i in body["instances"]] == [
        ("prefill-0", "prefill", True), ("decode-0", "decode", True)]

    backend.ready = False
    response = await client.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["instances"][0]["ready"] is False


async def test_health_is_degraded_while_a_role_still_has_a_ready_instance(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    def cluster(*down: str) -> tuple[InstanceLoad, ...]:
        return (InstanceLoad("prefill-0", "prefill", ready="prefill-0" not in down),
                InstanceLoad("prefill-1", "prefill", ready="prefill-1" not in down),
                InstanceLoad("decode-0", "decode", ready=True))

    backend.health_instances = cluster("prefill-1")  # dead or restarting
    response = await client.get("/health")
    assert (response.status_code, response.json()["status"]) == (200, "degraded")
    assert [i["ready"] for i in response.json()["instances"]] == [True, False, True]

    backend.health_instances = cluster("prefill-0", "prefill-1")  # no prefill left
    response = await client.get("/health")
    assert (response.status_code, response.json()["status"]) == (503, "unavailable")

    backend.health_instances = cluster()
    assert (await client.get("/health")).json()["status"] == "ok"


async def test_metrics_count_requests_tokens_and_instances(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    ok = await client.post("/v1/chat/completions", json=CHAT)
    await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await client.post("/v1/chat/completions", json={**CHAT, "n": 3})

    text = (await client.get("/metrics")).text
    chat = "/v1/chat/completions"
    assert metric(text, "shuffleinfer_requests_total", endpoint=chat, status="200") == 2
    assert metric(text, "shuffleinfer_requests_total", endpoint=chat, status="400") == 1
    # One count per request, not per delta.
    assert metric(text, "shuffleinfer_requests_prefilled_total", instance="prefill-0") == 2
    assert metric(text, "shuffleinfer_requests_decoded_total", instance="decode-0") == 2
    usage = ok.json()["usage"]
    assert metric(text, "shuffleinfer_prompt_tokens_total") == 2 * usage["prompt_tokens"]
    assert metric(text, "shuffleinfer_generation_tokens_total") == 2 * usage[
        "completion_tokens"]
    for name in ("shuffleinfer_time_to_first_token_seconds",
                 "shuffleinfer_e2e_request_latency_seconds"):
        assert metric(text, f"{name}_count") == 2
    assert metric(text, "shuffleinfer_inter_token_latency_seconds_count") == 2 * (
        usage["completion_tokens"] - 1)
    for name in ("shuffleinfer_kv_expired_leases_total",
                 "shuffleinfer_kv_recomputed_tokens_total", "shuffleinfer_kv_unauthorized_total"):
        assert f"\n{name} 0.0" in text
    for name in ("shuffleinfer_kv_transfers", "shuffleinfer_kv_transfer_failures",
                 "shuffleinfer_kv_transfer_bytes", "shuffleinfer_kv_transfer_seconds"):
        assert f"# HELP {name}" in text  # labelled by transport: no series until a transfer


async def test_ttft_and_inter_token_latency_follow_the_backend_pace(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.first_delay_s, backend.delay_s = 0.15, 0.03

    await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True})

    text = (await client.get("/metrics")).text
    ttft_s = metric(text, "shuffleinfer_time_to_first_token_seconds_sum")
    itl_mean_s = (metric(text, "shuffleinfer_inter_token_latency_seconds_sum")
                  / metric(text, "shuffleinfer_inter_token_latency_seconds_count"))
    e2e_s = metric(text, "shuffleinfer_e2e_request_latency_seconds_sum")
    assert 0.15 <= ttft_s < 0.5
    assert 2.5 < ttft_s / itl_mean_s < 10  # 0.15 s vs 0.03 s
    assert e2e_s >= ttft_s + 4 * 0.03


async def test_kv_counters_follow_the_backend_totals(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.kv = KVTransferStats(
        {"shm": TransportStats(num_transfers=3, num_bytes=3000, seconds=(0.01, 0.02)),
         "none": TransportStats(num_failures=1)},
        num_expired_leases=1, num_recomputed_tokens=256, num_unauthorized=2)
    text = (await client.get("/metrics")).text
    assert metric(text, "shuffleinfer_kv_transfers_total", transport="shm") == 3
    assert metric(text, "shuffleinfer_kv_transfer_failures_total", transport="none") == 1
    assert metric(text, "shuffleinfer_kv_transfer_bytes_total", transport="shm") == 3000
    assert metric(text, "shuffleinfer_kv_transfer_seconds_count", transport="shm") == 2
    assert metric(text, "shuffleinfer_kv_expired_leases_total") == 1
    assert metric(text, "shuffleinfer_kv_recomputed_tokens_total") == 256
    assert metric(text, "shuffleinfer_kv_unauthorized_total") == 2

    backend.kv = KVTransferStats(
        {"shm": TransportStats(num_transfers=4, num_bytes=4000, seconds=(0.03,)),
         "tcp": TransportStats(num_transfers=1, num_bytes=1000, seconds=(0.04,)),
         "none": TransportStats(num_failures=1)},
        num_expired_leases=1, num_recomputed_tokens=256, num_unauthorized=2)
    text = (await client.get("/metrics")).text
    assert metric(text, "shuffleinfer_kv_transfers_total", transport="shm") == 4
    assert metric(text, "shuffleinfer_kv_transfers_total", transport="tcp") == 1
    assert metric(text, "shuffleinfer_kv_transfer_bytes_total", transport="shm") == 4000
    assert metric(text, "shuffleinfer_kv_transfer_seconds_count", transport="shm") == 3
    assert abs(metric(text, "shuffleinfer_kv_transfer_seconds_sum", transport="shm")
               - 0.06) < 1e-9
    assert metric(text, "shuffleinfer_kv_transfer_seconds_count", transport="tcp") == 1
    assert metric(text, "shuffleinfer_kv_recomputed_tokens_total") == 256


async def test_prediction_metrics_follow_the_backend(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.predictions = PredictionStats(num_on_time=8, num_late=1, num_failed=1,
                                          num_scored=9, num_bucket_hits=6,
                                          abs_errors=(10, 30, 200), predict_seconds=(0.0003,),
                                          version=42)
    text = (await client.get("/metrics")).text
    assert metric(text, "shuffleinfer_predictions_total", outcome="on_time") == 8
    assert metric(text, "shuffleinfer_predictions_total", outcome="late") == 1
    assert metric(text, "shuffleinfer_prediction_bucket_hits_total") == 6
    assert metric(text, "shuffleinfer_prediction_scored_total") == 9
    assert metric(text, "shuffleinfer_prediction_abs_error_tokens_sum") == 240
    assert metric(text, "shuffleinfer_predictor_version") == 42
    backend.predictions = PredictionStats(num_on_time=10, num_late=1, num_failed=1,
                                          num_scored=10, num_bucket_hits=7, abs_errors=(5,))
    text = (await client.get("/metrics")).text
    assert metric(text, "shuffleinfer_predictions_total", outcome="on_time") == 10
    assert metric(text, "shuffleinfer_prediction_abs_error_tokens_count") == 4
    assert metric(text, "shuffleinfer_prediction_seconds_count") == 1


async def test_failing_kv_stats_still_serves_metrics_and_counts_the_failure(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    async def broken() -> KVTransferStats:
        raise ConnectionError("decode instance gone")

    backend.kv_stats = broken  # type: ignore[method-assign]
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert metric(response.text, "shuffleinfer_kv_stats_errors_total") == 1


async def test_two_apps_keep_separate_metrics(app: FastAPI, backend: FakeBackend) -> None:
    other = create_app(backend)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as first, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=other),
                              base_url="http://test") as second:
        await first.post("/v1/chat/completions", json=CHAT)
        name = "shuffleinfer_requests_total"
        labels = {"endpoint": "/v1/chat/completions", "status": "200"}
        assert metric((await first.get("/metrics")).text, name, **labels) == 1
        assert metric((await second.get("/metrics")).text, name, **labels) == 0


async def test_models_lists_the_served_name(client: httpx.AsyncClient,
                                            backend: FakeBackend) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["root"]) for m in body["data"]] == [
        ("smol", "model", backend.model_name)]


async def test_failovers_are_counted_by_leg(client: httpx.AsyncClient,
                                            backend: FakeBackend) -> None:
    backend.failovers = {"prefill": 2, "decode": 1}
    text = (await client.get("/metrics")).text
    assert metric(text, "shuffleinfer_failovers_total", leg="prefill") == 2
    assert metric(text, "shuffleinfer_failovers_total", leg="decode") == 1
    backend.failovers = {"prefill": 3, "decode": 1}
    text = (await client.get("/metrics")).text
    assert metric(text, "shuffleinfer_failovers_total", leg="prefill") == 3
    assert metric(text, "shuffleinfer_failovers_total", leg="decode") == 1
