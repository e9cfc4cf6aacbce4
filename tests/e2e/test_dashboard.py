"""grafana/dashboards/aisix.json: the panels the observability guide lists, on aisix's
metric families only (the seed's five and routing's per-deployment ones), and PromQL that a real
Prometheus accepts and answers."""
import json
import math
import re
import time

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tests.support import services

DASHBOARD = services.ROOT / "grafana" / "dashboards" / "aisix.json"

ROWS = {
    "Overview": ["Total Requests", "Total Tokens", "Avg Request Latency", "Avg LLM Latency"],
    "Request Throughput": ["QPS by Endpoint", "QPS by Status Code"],
    "Latency": ["Request Latency P50/P90/P99", "LLM Latency P50/P90/P99",
                "First Token Latency by Model", "LLM Latency by Model"],
    "Token Usage": ["Prompt vs Completion Token Rate", "Token Usage by Model",
                    "Cumulative Tokens", "Token Distribution by Model"],
    "Deployments": ["Upstream Attempts by Deployment and Status", "Upstream Latency P90 by Deployment", "Fallbacks",
                    "Tokens by Deployment"],
    "Streaming and Cost": ["Inter-Token Latency by Model", "Time per Output Token by Model",
                           "Spend by Model (USD per hour)", "Spend by Model"],
}
HISTOGRAMS = ["aisix_request_latency_milliseconds", "aisix_llm_latency_milliseconds",
              "aisix_llm_first_token_latency_milliseconds", "aisix_upstream_latency_milliseconds",
              "aisix_llm_inter_token_latency_milliseconds", "aisix_llm_time_per_output_token_milliseconds"]
METRICS = {"aisix_request_count_total", "aisix_token_count_total", "aisix_upstream_request_count_total",
           "aisix_deployment_token_count_total",
           "aisix_fallback_count_total", "aisix_cost_usd_total"} | {
    f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
LABELS = {"method", "endpoint", "status_code", "model", "type", "le", "deployment", "fallback"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless"}


def load():
    return json.loads(DASHBOARD.read_text())


def panels_by_row(dash):
    """{row title: [panel, ...]}, following Grafana's layout: a row holds the panels after it."""
    rows, current = {}, None
    for p in dash["panels"]:
        if p["type"] == "row":
            current = p["title"]
            rows[current] = list(p.get("panels", []))  # a collapsed row keeps its panels inside
        else:
            rows.setdefault(current, []).append(p)
    return rows


def exprs(dash):
    return [t["expr"] for ps in panels_by_row(dash).values() for p in ps for t in p.get("targets", [])]


def metric_names(expr):
    """Series names in a PromQL expression: identifiers left once strings, label matchers,
    ranges and grouping clauses are gone, that are neither functions nor keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    return {m.group(1) for m in re.finditer(r"([A-Za-z_:][\w:]*)\s*(\()?", e)
            if not m.group(2) and m.group(1) not in KEYWORDS}


def label_names(expr):
    """Label names in grouping clauses and label matchers."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    grouped = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", e)
    matched = re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", " ".join(re.findall(r"\{([^}]*)\}", e)))
    return {n.strip() for g in grouped for n in g.split(",") if n.strip()} | set(matched)


def test_title_rows_and_panels():
    dash = load()
    assert dash["title"] == "AI Gateway"
    rows = panels_by_row(dash)
    for row, titles in ROWS.items():
        assert row in rows, f"row {row!r} missing"
        assert titles == [p["title"] for p in rows[row]], row
    for ps in rows.values():
        for p in ps:
            assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]


def test_exprs_use_only_aisix_metric_families():
    assert metric_names('sum by (le) (rate(foo_bucket{a="b{c}"}[1m])) / bar') == {"foo_bucket", "bar"}
    assert label_names('sum by (le, model) (x{type!="a=b"})') == {"le", "model", "type"}
    for e in exprs(load()):
        names = metric_names(e)
        assert names and names <= METRICS, (e, names - METRICS)
        assert label_names(e) <= LABELS, (e, label_names(e) - LABELS)


def test_exprs_parse_in_real_prometheus(prometheus):
    for e in exprs(load()):
        prometheus.query(e)  # raises PromQLError with Prometheus's parse error


def _push_sample_traffic(otlp_url):
    """What the gateway records, with the same instrument names and units, pushed twice."""
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_url, timeout=5),
                                           export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create(
        {"service.name": "aisix", "service.instance.id": "dashboard-test"}))
    meter = provider.get_meter("aisix")
    requests = meter.create_counter("aisix_request_count")
    tokens = meter.create_counter("aisix_token_count")
    request_ms = meter.create_histogram("aisix_request_latency", unit="ms")
    llm_ms = meter.create_histogram("aisix_llm_latency", unit="ms")
    ttft_ms = meter.create_histogram("aisix_llm_first_token_latency", unit="ms")
    attempts = meter.create_counter("aisix_upstream_request_count")
    upstream_ms = meter.create_histogram("aisix_upstream_latency", unit="ms")
    fallbacks = meter.create_counter("aisix_fallback_count")
    deployment_tokens = meter.create_counter("aisix_deployment_token_count")
    itl_ms = meter.create_histogram("aisix_llm_inter_token_latency", unit="ms")
    tpot_ms = meter.create_histogram("aisix_llm_time_per_output_token", unit="ms")
    cost = meter.create_counter("aisix_cost_usd")
    for push in range(2):
        for status in ("200", "429"):
            requests.add(3, {"method": "POST", "endpoint": "/v1/chat/completions", "status_code": status})
            request_ms.record(120 + push, {"method": "POST", "endpoint": "/v1/chat/completions",
                                           "status_code": status})
        for model in ("gpt-4o", "claude"):
            tokens.add(10, {"model": model, "type": "prompt"})
            tokens.add(5, {"model": model, "type": "completion"})
            tokens.add(15, {"model": model, "type": "total"})
            llm_ms.record(100, {"model": model})
            ttft_ms.record(30, {"model": model})
            for deployment, status in (("east", "200"), ("west", "connect_error")):
                attempts.add(2, {"model": model, "deployment": deployment, "status_code": status})
                upstream_ms.record(80, {"model": model, "deployment": deployment})
                for kind, n in (("prompt", 5), ("completion", 2), ("total", 7)):
                    deployment_tokens.add(n, {"model": model, "deployment": deployment, "type": kind})
            fallbacks.add(1, {"model": model, "fallback": "backup"})
            itl_ms.record(20, {"model": model})
            tpot_ms.record(25, {"model": model})
            cost.add(0.01, {"model": model})
        assert reader.force_flush(10_000)
        time.sleep(1.1)  # two samples a second apart: rate(...[1m]) has something to work on
    provider.shutdown()


def test_every_expr_answers_on_gateway_shaped_data(tmp_path):
    # a Prometheus of its own: the session one must stay free of made-up aisix series
    with services.prometheus_server(tmp_path) as prom:
        _push_sample_traffic(prom.otlp_url)
        for name in METRICS:
            prom.wait_for(name, timeout=10)
        for e in exprs(load()):
            values = [float(r["value"][1]) for r in prom.query(e)]
            assert any(not math.isnan(v) for v in values), (e, values)


def test_latency_panels_show_exemplars_that_open_the_trace_in_jaeger():
    """Each latency panel asks for exemplars (a sampled request's trace_id, see the gateway's
    exemplar test); the Prometheus datasource links their trace_id to the Jaeger datasource."""
    import yaml
    rows = panels_by_row(load())
    for title in ROWS["Latency"]:
        panel = next(p for p in rows["Latency"] if p["title"] == title)
        assert any(t.get("exemplar") for t in panel["targets"]), title
    sources = yaml.safe_load((services.ROOT / "grafana/provisioning/datasources/datasource.yml").read_text())
    by_uid = {s["uid"]: s for s in sources["datasources"]}
    links = by_uid["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert [(link["name"], by_uid[link["datasourceUid"]]["type"]) for link in links] == [("trace_id", "jaeger")]
