"""/admin/*: the admin token guards every route; list, drain, resume and flip instances."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from shuffleinfer.api import create_app
from shuffleinfer.protocol import InstanceLoad, InstanceRole

from .conftest import API_KEY, FakeBackend, metric
from .test_errors import assert_error

ADMIN_TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
INSTANCES = "/admin/instances"
ACTIONS = ("drain", "resume", "flip")


@pytest.fixture
async def admin(backend: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app with both an api key and an admin token (sending neither)."""
    app = create_app(backend, api_key=API_KEY, admin_token=ADMIN_TOKEN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        yield http


async def listing(admin: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """GET /admin/instances as {instance_id: instance}."""
    response = await admin.get(INSTANCES, headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return {instance["instance_id"]: instance for instance in body["data"]}


async def test_admin_routes_answer_403_without_an_admin_token(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    before = dict(backend.loads)
    responses = [await client.get(INSTANCES, headers=ADMIN)]
    for action in ACTIONS:
        responses.append(await client.post(f"{INSTANCES}/decode-1/{action}", headers=ADMIN))
    for response in responses:
        message = assert_error(response, 403, None, "permission_error")
        assert "--admin-token" in message and "SHUFFLEINFER_ADMIN_TOKEN" in message
    assert backend.loads == before


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN},
    {"Authorization": f"Basic {ADMIN_TOKEN}"},
])
async def test_admin_routes_need_the_admin_token(
    admin: httpx.AsyncClient, backend: FakeBackend, headers: dict[str, str]
) -> None:
    before = dict(backend.loads)
    responses = [await admin.get(INSTANCES, headers=headers)]
    for action in ACTIONS:
        responses.append(await admin.post(f"{INSTANCES}/decode-1/{action}", headers=headers))
    for response in responses:
        assert "admin token" in assert_error(response, 401, None, "authentication_error")
        assert response.headers["www-authenticate"] == "Bearer"
    assert backend.loads == before


async def test_api_key_and_admin_token_open_only_their_own_routes(
    admin: httpx.AsyncClient,
) -> None:
    api = {"Authorization": f"Bearer {API_KEY}"}
    assert_error(await admin.get(INSTANCES, headers=api), 401, None, "authentication_error")
    assert_error(await admin.post(f"{INSTANCES}/decode-1/drain", headers=api), 401, None,
                 "authentication_error")
    assert_error(await admin.get("/v1/models", headers=ADMIN), 401, None,
                 "authentication_error")

    assert (await admin.get("/v1/models", headers=api)).status_code == 200
    assert (await admin.get(INSTANCES, headers=ADMIN)).status_code == 200


async def test_listing_shows_each_instances_role_state_and_load(
    admin: httpx.AsyncClient,
) -> None:
    instances = await listing(admin)

    assert {i: (x["role"], x["state"], x["ready"]) for i, x in instances.items()} == {
        "prefill-0": ("prefill", "active", True), "prefill-1": ("prefill", "active", True),
        "decode-0": ("decode", "active", True), "decode-1": ("decode", "active", True)}
    assert instances["prefill-0"]["num_waiting_reqs"] == 2
    assert instances["prefill-0"]["num_queued_prompt_tokens"] == 300
    assert instances["decode-0"]["num_running_reqs"] == 1
    assert instances["decode-0"]["kv_cache_usage"] == 0.25
    assert set(instances["decode-1"]) == {f.name for f in dataclasses.fields(InstanceLoad)}


async def test_drain_then_resume(admin: httpx.AsyncClient) -> None:
    drained = await admin.post(f"{INSTANCES}/prefill-1/drain", headers=ADMIN)
    assert drained.status_code == 200, drained.text
    assert (drained.json()["instance_id"], drained.json()["state"]) == ("prefill-1", "draining")
    assert (await listing(admin))["prefill-1"]["state"] == "draining"

    resumed = await admin.post(f"{INSTANCES}/prefill-1/resume", headers=ADMIN)
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["state"] == "active"
    assert {x["state"] for x in (await listing(admin)).values()} == {"active"}


@pytest.mark.parametrize("body", [None, {}, {"role": "prefill"}])
async def test_flip_answers_202_and_the_instance_lists_as_flipping(
    admin: httpx.AsyncClient, body: dict[str, str] | None
) -> None:
    response = await admin.post(f"{INSTANCES}/decode-1/flip", headers=ADMIN, json=body)

    assert response.status_code == 202, response.text
    assert response.json()["state"] == "flipping"
    assert (await listing(admin))["decode-1"]["state"] == "flipping"
    # Still flipping: neither a second flip nor a resume may interrupt it.
    again = await admin.post(f"{INSTANCES}/decode-1/flip", headers=ADMIN)
    assert "flipping" in assert_error(again, 409, None, "conflict_error")
    assert_error(await admin.post(f"{INSTANCES}/decode-1/resume", headers=ADMIN), 409, None,
                 "conflict_error")


async def test_flip_already_done_answers_200(
    admin: httpx.AsyncClient, backend: FakeBackend
) -> None:
    async def flip_idle(instance_id: str, role: InstanceRole | None = None) -> InstanceLoad:
        load = dataclasses.replace(backend.loads[instance_id], role="prefill")
        backend.loads[instance_id] = load
        return load

    backend.flip = flip_idle  # type: ignore[method-assign]
    response = await admin.post(f"{INSTANCES}/decode-1/flip", headers=ADMIN)

    assert response.status_code == 200, response.text
    assert (response.json()["role"], response.json()["state"]) == ("prefill", "active")


async def test_flip_to_the_role_it_has_is_a_conflict(admin: httpx.AsyncClient) -> None:
    response = await admin.post(f"{INSTANCES}/decode-1/flip", headers=ADMIN,
                                json={"role": "decode"})
    assert "already" in assert_error(response, 409, None, "conflict_error")
    assert (await listing(admin))["decode-1"]["state"] == "active"


@pytest.mark.parametrize("action", ACTIONS)
async def test_unknown_instance_is_404(admin: httpx.AsyncClient, action: str) -> None:
    response = await admin.post(f"{INSTANCES}/decode-9/{action}", headers=ADMIN)
    assert "decode-9" in assert_error(response, 404, None, "not_found_error")


async def test_the_last_active_instance_of_a_role_is_not_drained_or_flipped(
    admin: httpx.AsyncClient,
) -> None:
    assert (await admin.post(f"{INSTANCES}/decode-0/drain", headers=ADMIN)).status_code == 200

    for action in ("drain", "flip"):
        response = await admin.post(f"{INSTANCES}/decode-1/{action}", headers=ADMIN)
        message = assert_error(response, 409, None, "conflict_error")
        assert "last active decode" in message
    assert (await listing(admin))["decode-1"]["state"] == "active"


@pytest.mark.parametrize(("body", "param", "named"), [
    ('{"role": "verifier"}', "role", "`role`"),
    ('{"role": 1}', "role", "`role`"),
    ('{"role": true}', "role", "`role`"),
    ('{"target": "prefill"}', "target", "Unknown field `target`"),
    ("[]", None, "JSON object"),
    ("{role: prefill}", None, "Malformed JSON"),
])
async def test_bad_flip_body_is_400_and_changes_nothing(
    admin: httpx.AsyncClient, backend: FakeBackend, body: str, param: str | None, named: str
) -> None:
    before = dict(backend.loads)
    response = await admin.post(f"{INSTANCES}/decode-1/flip", content=body,
                                headers={**ADMIN, "content-type": "application/json"})
    assert named in assert_error(response, 400, param)
    assert backend.loads == before


async def test_admin_calls_are_counted_and_changes_logged(
    admin: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shuffleinfer.api.admin")
    await listing(admin)
    await admin.post(f"{INSTANCES}/decode-0/drain", headers=ADMIN)
    await admin.post(f"{INSTANCES}/decode-1/drain", headers=ADMIN)  # the last active one
    await admin.post(f"{INSTANCES}/decode-1/flip")  # no token

    text = (await admin.get("/metrics")).text
    counted = "shuffleinfer_admin_actions_total"
    assert metric(text, counted, action="list", outcome="ok") == 1
    assert metric(text, counted, action="drain", outcome="ok") == 1
    assert metric(text, counted, action="drain", outcome="conflict_error") == 1
    assert metric(text, counted, action="flip", outcome="authentication_error") == 1
    logged = [r.getMessage() for r in caplog.records]
    assert any("drain decode-0: ok" in line for line in logged), logged
    assert any("drain decode-1: conflict_error" in line for line in logged), logged
    assert any("flip decode-1: authentication_error" in line for line in logged), logged


async def test_an_empty_admin_token_disables_admin_routes(backend: FakeBackend) -> None:
    app = create_app(backend, admin_token="")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        response = await http.get(INSTANCES, headers={"Authorization": "Bearer "})
    assert_error(response, 403, None, "permission_error")
