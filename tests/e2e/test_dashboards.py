"""deploy/grafana's dashboard and deploy/prometheus' alert rules name only
metrics a running gateway exports, and the dashboard shows every one of them.

The names come from a real scrape of /metrics after some traffic (a gateway
with DS_METRICS=1); those of the PromQL expressions are simply every
``durable_streams_*`` word in them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.gateway_server import GatewayServer

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "durable-streams.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
METRIC_NAME = re.compile(r"\bdurable_streams_[a-z0-9_]+\b")
# The series a histogram or counter family exposes besides its own name.
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}


@pytest.fixture(scope="module")
def exported(redis_url: str) -> Iterator[set[str]]:
    """Every series name the gateway exports, after appends, reads and a long-poll."""
    with GatewayServer(
        redis_url=redis_url, env={"DS_METRICS": "1", "DS_LONG_POLL_TIMEOUT_MS": "300"}
    ) as gw:
        path = f"{gw.url}/v1/stream/dash-{uuid.uuid4().hex}"
        httpx.put(path, headers={"Content-Type": "text/plain"})
        for _ in range(3):
            httpx.post(path, content=b"hello", headers={"Content-Type": "text/plain"})
        httpx.get(f"{path}?offset=-1")
        httpx.get(f"{path}?offset=now&live=long-poll", timeout=10)
        text = httpx.get(gw.url + "/metrics").text
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            # (a counter's TYPE line names it with its _total already)
            family = family.removesuffix("_total")
            names.update(family + suffix for suffix in SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    yield {name for name in names if name.startswith("durable_streams_")}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_referenced_metric_is_exported(exported: set[str], source: str) -> None:
    expressions = dashboard_expressions() if source == "dashboard" else alert_expressions()
    assert expressions
    for expr in expressions:
        referenced = set(METRIC_NAME.findall(expr))
        assert referenced, f"no durable_streams_ metric in {expr!r}"
        assert referenced <= exported, f"{sorted(referenced - exported)} not exported ({expr!r})"


def test_the_dashboard_shows_every_exported_family(exported: set[str]) -> None:
    shown = {name for expr in dashboard_expressions() for name in METRIC_NAME.findall(expr)}
    families = {re.sub(r"_(bucket|sum|count|created)$", "", name) for name in exported}
    missing = {
        family
        for family in families
        if not any(name == family or name.startswith(family + "_") for name in shown)
    }
    assert not missing, f"exported but on no panel: {sorted(missing)}"


def test_the_alert_rules_are_well_formed() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in ("page", "warning", "info")
