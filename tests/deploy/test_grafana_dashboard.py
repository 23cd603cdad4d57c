"""deploy/grafana/shuffleinfer-dashboard.json: importable Grafana dashboard JSON whose
PromQL parses and names only metrics and labels the api really exports.

The exported names come from the real app (`create_app` over the fake backend of the api
tests), scraped through GET /metrics after one request, so labelled series exist too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import promql_parser
import pytest
from api.conftest import FakeBackend, build_byte_tokenizer
from deploy_files import DEPLOY
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from shuffleinfer.api import create_app
from shuffleinfer.protocol import KVTransferStats, PredictionStats, TransportStats

DASHBOARD = DEPLOY / "grafana/shuffleinfer-dashboard.json"
# What Grafana substitutes before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
                     "$job": ".*"}
# Every scraped series also carries its target's labels. A metric's own `instance` label
# clashes with the target's; Prometheus keeps it as `exported_instance`.
TARGET_LABELS = {"job", "instance"}


@cache
def exported_labels() -> dict[str, frozenset[str]]:
    """Sample name (`*_total`, `*_bucket`, ...) -> its labels, from the app's /metrics."""
    backend = FakeBackend(build_byte_tokenizer())
    backend.kv = KVTransferStats({"shm": TransportStats(num_transfers=2, num_failures=1,
                                                        num_bytes=4096,
                                                        seconds=(0.002, 0.004))})
    backend.predictions = PredictionStats(num_on_time=3, num_late=1, num_failed=1,
                                          num_scored=2, num_bucket_hits=1,
                                          abs_errors=(12, 80), predict_seconds=(0.0004,),
                                          version=7)
    backend.failovers = {"prefill": 1, "decode": 1}
    with TestClient(create_app(backend, served_model_name="smol")) as client:
        chat = {"model": "smol", "messages": [{"role": "user", "content": "Hi!"}]}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        response = client.get("/metrics")
    assert response.status_code == 200
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(found) for name, found in labels.items()}


def scraped_labels(sample_name: str) -> set[str]:
    """The labels a sample carries once Prometheus has scraped it."""
    own = exported_labels()[sample_name]
    renamed = {f"exported_{label}" if label in TARGET_LABELS else label for label in own}
    return renamed | TARGET_LABELS


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries() -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query in the dashboard."""
    return [(p["title"], t) for p in panels() for t in p.get("targets", [])]


def substituted(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def selectors_and_groupings(expr: str) -> tuple[list[Any], list[tuple[list[str], set[str]]]]:
    """Vector selectors of a PromQL expression, and each `by (...)` with the metrics below."""
    selectors: list[Any] = []
    groupings: list[tuple[list[str], Any]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            below: list[Any] = []
            promql_parser.walk(node.expr, lambda n: below.append(n) if isinstance(
                n, promql_parser.VectorSelector) else None)
            groupings.append((list(node.modifier.labels), {s.name for s in below}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return selectors, groupings


@pytest.mark.parametrize(("title", "target"), queries(),
                         ids=[f"{t}/{q['refId']}" for t, q in queries()])
def test_query_names_only_exported_metrics_and_labels(title: str, target: dict[str, Any]) -> None:
    expr = substituted(target["expr"])
    selectors, groupings = selectors_and_groupings(expr)
    assert selectors, expr
    for selector in selectors:
        assert selector.name in exported_labels(), f"{title}: {selector.name} is not exported"
        for matcher in selector.matchers.matchers:
            assert matcher.name in scraped_labels(selector.name), (title, matcher.name)
    for labels, metrics in groupings:
        for label in labels:
            assert any(label in scraped_labels(m) for m in metrics), (title, label, metrics)
    legend_labels = set(re.findall(r"{{\s*(\w+)\s*}}", target.get("legendFormat", "")))
    kept = set().union(*(labels for labels, _ in groupings)) if groupings else set()
    assert legend_labels <= kept, f"{title}: legend {legend_labels} not in by ({kept})"


def test_check_rejects_unknown_metrics_and_labels() -> None:
    """The check is live: a misspelt metric or label does not get through."""
    selectors, groupings = selectors_and_groupings(
        "sum by (instance_id) (rate(shuffleinfer_request_total[1m]))")
    assert selectors[0].name not in exported_labels()
    assert "instance_id" not in scraped_labels("shuffleinfer_requests_prefilled_total")
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(shuffleinfer_requests_total[1m])")


def test_every_exported_metric_family_is_on_the_dashboard() -> None:
    charted = {s.name for _, t in queries() for s in
               selectors_and_groupings(substituted(t["expr"]))[0]}
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name)
                for name in exported_labels()}
    missing = {f for f in families
               if not any(re.sub(r"_(total|bucket|sum|count)$", "", c) == f for c in charted)}
    assert not missing, f"add these to {DASHBOARD.name}: {sorted(missing)}"


def test_dashboard_is_importable_grafana_json() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    prometheus = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["job"]["datasource"] == prometheus
    ids, cells = set(), set()
    for panel in panels():
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        pos = panel["gridPos"]
        assert pos["w"] >= 1 and pos["h"] >= 1 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["datasource"] == prometheus and panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        assert all(t["datasource"] == prometheus for t in panel["targets"]), panel["title"]
