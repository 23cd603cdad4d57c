"""kv_connector_extra_config is validated once, when vLLM builds the connector."""

from __future__ import annotations

from typing import Any

import pytest

from shuffleinfer.kv.options import ConnectorOptions


def test_defaults_and_the_keys_the_engine_passes() -> None:
    opts = ConnectorOptions.from_extra({"host": "0.0.0.0", "advertise_host": "10.1.2.3",
                                        "port": 7100, "lease_s": 5})
    assert opts == ConnectorOptions(port=7100, host="0.0.0.0", advertise_host="10.1.2.3",
                                    lease_s=5.0, pull_timeout_s=10.0, transport="auto",
                                    auth_token=None)
    assert ConnectorOptions.from_extra({"port": 0, "host": "h"}).advertise_host == "h"


def test_overlap_is_off_unless_asked_and_staging_is_bounded() -> None:
    assert not ConnectorOptions.from_extra({"port": 1}).overlap
    opts = ConnectorOptions.from_extra({"port": 1, "overlap": True, "staging_mib": 64})
    assert (opts.overlap, opts.staging_mib) == (True, 64)


def test_transport_and_auth_token() -> None:
    opts = ConnectorOptions.from_extra({"port": 1, "transport": "shm", "auth_token": "s"})
    assert (opts.transport, opts.auth_token) == ("shm", "s")


@pytest.mark.parametrize(("extra", "message"), [
    ({}, "needs a port"),
    ({"port": 70000}, "out of range"),
    ({"port": 1, "transport": "udp"}, "unknown KV transport 'udp'"),
    ({"port": 1, "auth_token": ""}, "non-empty string"),
    ({"port": 1, "auth_token": 42}, "non-empty string"),
    ({"port": 1, "lease_s": 0}, "positive"),
    ({"port": 1, "overlap": "yes"}, "overlap must be true or false"),
    ({"port": 1, "staging_mib": -1}, "staging_mib must be a non-negative integer"),
    ({"port": 1, "transprot": "tcp"}, r"unknown kv_connector_extra_config keys \['transprot'\]"),
])
def test_bad_extra_config_is_refused_naming_the_key(extra: dict[str, Any],
                                                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectorOptions.from_extra(extra)


def test_the_handshake_names_the_model_by_its_last_path_part_and_the_tp_size() -> None:
    from types import SimpleNamespace

    from shuffleinfer.kv.connector import handshake_identity

    config = SimpleNamespace(model_config=SimpleNamespace(model="/cache/models/SmolLM2-135M/"),
                             parallel_config=SimpleNamespace(tensor_parallel_size=2))
    assert handshake_identity(config) == {"model": "SmolLM2-135M",  # type: ignore[arg-type]
                                          "tp_size": 2}
