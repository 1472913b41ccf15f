"""deploy/grafana/amserve.json and deploy/prometheus: the dashboard is well-formed, its datasource is
templated, every query parses as PromQL, refers only to metrics that exist (the gateway's registry,
Triton's nv_*), and every gateway metric of docs/metrics.md plus the Triton metrics asked for has a panel."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy.metric_names import gateway_metrics, gateway_series
from tests.harness import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "amserve.json"
TRITON_REQUIRED = {"nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                   "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"}
TRITON_KNOWN = TRITON_REQUIRED | {"nv_inference_request_failure", "nv_gpu_utilization", "nv_gpu_memory_used_bytes"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$gateway_job": ".*", "$triton_job": ".*"}
IDENTIFIER = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects (with promql_parser's AST when installed, else lexically)."""
    try:
        import promql_parser
    except ImportError:
        without_labels = re.sub(r"\{[^}]*\}", "", re.sub(r'"[^"]*"', "", expr))
        return {m for m in IDENTIFIER.findall(without_labels) if m.startswith(("amserve_", "nv_", "up"))}
    names = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if isinstance(child, promql_parser.Expr):
                visit(child)
        for child in getattr(node, "args", None) or []:
            visit(child)

    visit(promql_parser.parse(expr))
    return names


def test_layout_and_templated_datasource(dashboard):
    assert dashboard["uid"] == "amserve" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    occupied = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & occupied, f"panel {panel['title']} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    for name in ("gateway_job", "triton_job"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_every_query_parses_and_names_real_metrics(dashboard):
    exported = gateway_series()
    for title, expr in queries(dashboard):
        concrete = substitute(expr)
        try:
            names = metric_names(concrete)
        except ValueError as exc:
            pytest.fail(f"{title}: {concrete}: {exc}")
        assert names, f"{title}: selects no metric"
        for name in names:
            if name.startswith("amserve_"):
                assert name in exported, f"{title}: {name} is not exported by the gateway"
            elif name.startswith("nv_"):
                assert name in TRITON_KNOWN, f"{title}: {name} is not a Triton metric used here"
            else:
                assert name == "up", f"{title}: unexpected metric {name}"
        if "amserve_" in concrete:
            assert 'job=~".*"' in concrete, f"{title}: gateway queries filter on $gateway_job"


def test_query_checker_catches_mistakes():
    pytest.importorskip("promql_parser")
    with pytest.raises(ValueError):
        metric_names("sum by (route (rate(amserve_requests_total[5m]))")
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(amserve_ttft_bucket{job=~".*"}[5m])))') == {"amserve_ttft_bucket"}


def test_every_documented_metric_has_a_panel(dashboard):
    used = set().union(*(metric_names(substitute(e)) for _, e in queries(dashboard)))
    documented = set(re.findall(r"^\| `(amserve_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.M))
    families = gateway_metrics()
    assert documented, "docs/metrics.md lists no metric"
    for name in documented | set(families):
        family = name.removesuffix("_total")
        suffixes = ("_total",) if families.get(family) == "counter" else ("_bucket", "_sum", "_count", "")
        assert any(family + s in used for s in suffixes), f"no panel shows {name}"
    assert TRITON_REQUIRED <= used


def test_prometheus_scrapes_gateway_and_triton():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["amserve-gateway"]["metrics_path"] == "/metrics"
    assert jobs["amserve-triton"]["static_configs"][0]["targets"] == ["triton:8012"]


def test_adapter_rules_parse():
    pytest.importorskip("promql_parser")
    import promql_parser

    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus" / "adapter-values.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'namespace="amserve",pod=~"amserve-gateway-.*"')
                 .replace("<<.GroupBy>>", "pod"))
        promql_parser.parse(query)
        assert metric_names(query) <= gateway_series()
