"""``deploy/grafana/overnight.json`` is built from the metrics ``/metrics`` exposes:
every query names only series a live server exposes, and every overnight metric
family has a panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from overnight.api.app import create_app
from overnight.config import Settings
from overnight.metrics import METRIC_NAMES

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "overnight.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
# PromQL words that look like names: functions, aggregations, keywords.
NAME_RE = re.compile(r"\b(overnight_[a-z0-9_]+)\b")


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p.get("targets", [])]


@pytest.fixture
async def exposed(tmp_path) -> dict[str, str]:
    """Series name -> its family, as a freshly started server's ``/metrics`` shows them."""
    app = create_app(Settings(data_dir=tmp_path, engine_url="http://127.0.0.1:9"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            text = (await c.get("/metrics")).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(fam.type, ("",)):
            out[fam.name + suffix] = fam.name
    return out


def test_dashboard_is_grafana_json_with_a_prometheus_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    (ds,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    for p in panels(dash):
        assert p["title"] and set(p["gridPos"]) == {"h", "w", "x", "y"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${" + ds["name"] + "}"
            assert [t["refId"] for t in p["targets"]] == [chr(65 + i) for i in range(len(p["targets"]))]


async def test_every_query_names_only_exposed_series(exposed) -> None:
    dash = json.loads(DASHBOARD.read_text())
    unknown = {name for e in exprs(dash) for name in NAME_RE.findall(e) if name not in exposed}
    assert not unknown, f"the dashboard queries series /metrics does not expose: {sorted(unknown)}"


async def test_every_overnight_metric_has_a_panel(exposed) -> None:
    dash = json.loads(DASHBOARD.read_text())
    used = {exposed[name] for e in exprs(dash) for name in NAME_RE.findall(e) if name in exposed}
    families = {f for f in exposed.values() if f.startswith("overnight_")}
    assert families == {n.removesuffix("_total") for n in METRIC_NAMES}
    assert used == families, f"no panel for {sorted(families - used)}"
