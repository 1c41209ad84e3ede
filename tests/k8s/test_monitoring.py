"""Prometheus rules, the Grafana dashboard and the prometheus-adapter rule.

Every PromQL query (alerts, dashboard panels and variables, adapter series)
names only metrics and labels the service really exports; the rules pass
`promtool check rules`, the alert logic is exercised with `promtool test
rules`, the dashboard queries parse, and the dashboard is provisioned as a
labelled ConfigMap.
"""

from __future__ import annotations

import json
import re
import subprocess

import grpc
import kubernetes_validate
import pytest
import yaml

from k8s_metrics import from_contract, from_exposition, live_server_available, scrape_live_server
from k8s_tools import (K8S, PROMQL_FUNCTIONS, grafana_to_promql, kustomize, one, promql_identifiers,
                       promql_label_names, require_tool)

DASHBOARD = K8S / "grafana" / "dashboard.json"
# Series Prometheus itself makes for every scrape target (not exported by the service).
PROMETHEUS_SERIES = {"up": set()}
# Labels Prometheus Operator attaches to every scraped series of a ServiceMonitor target.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
REQUIRED_ALERTS = {"PixelPruneTTFTP99High", "PixelPruneHighErrorRate", "PixelPruneQueueSaturated",
                   "PixelPruneRequestsRejected", "PixelPruneRedisErrors", "PixelPruneReplicaDown",
                   "PixelPruneAllReplicasDown"}
PROMTOOL_INSTALL = "apt-get install prometheus (Debian package providing promtool)"


@pytest.fixture(scope="module")
def exported(request) -> dict[str, set[str]]:
    """Series names -> label names: from a live server's /metrics when the service exists."""
    if live_server_available():
        names = from_exposition(scrape_live_server(request.getfixturevalue("tiny_checkpoint")))
    else:
        names = from_contract()
    return {**names, **PROMETHEUS_SERIES}


@pytest.fixture(scope="module")
def rules() -> dict:
    return one(kustomize(K8S / "overlays" / "gpu"), "PrometheusRule")["spec"]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(dashboard) -> list[tuple[str, str]]:
    """(where, PromQL with Grafana variables) for every panel target."""
    return [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
            for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def variable_selectors(dashboard) -> list[tuple[str, str]]:
    """The series selector inside each `label_values(selector, label)` variable query."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert match, f"variable {var['name']}: unexpected query"
            out.append((f"variable {var['name']}", match.group(1)))
    return out


def adapter_config() -> dict:
    adapter = one(kustomize(K8S / "monitoring"), "ConfigMap", "pixelprune-prometheus-adapter")
    return yaml.safe_load(adapter["data"]["config.yaml"])


def all_queries(rules, dashboard) -> list[tuple[str, str]]:
    queries = [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    queries += panel_queries(dashboard) + variable_selectors(dashboard)
    queries += [("adapter seriesQuery", r["seriesQuery"]) for r in adapter_config()["rules"]]
    return queries


def test_contract_names_are_all_exported(exported):
    """The names the dashboard was written against (INTERFACES.md) are the ones the server exports."""
    if not live_server_available():
        pytest.skip("service.server.create_server does not exist yet: the contract stands in for the server")
    assert set(from_contract()) <= set(exported)
    for name, labels in from_contract().items():
        assert labels <= exported[name], f"{name}: labels {exported[name]}, contract {labels}"


def test_every_promql_metric_is_exported(rules, dashboard, exported):
    missing = []
    for where, expr in all_queries(rules, dashboard):
        metrics, functions = promql_identifiers(expr)
        assert metrics, f"{where}: no metric in {expr!r}"
        missing += [f"{where}: {m}" for m in sorted(metrics - set(exported))]
    assert not missing, "queries name series the service does not export:\n" + "\n".join(missing)


def test_every_promql_label_exists_on_its_metrics(rules, dashboard, exported):
    wrong = []
    for where, expr in all_queries(rules, dashboard):
        metrics, _ = promql_identifiers(expr)
        allowed = TARGET_LABELS.union(*(exported.get(m, set()) for m in metrics))
        wrong += [f"{where}: {label}" for label in sorted(promql_label_names(expr) - allowed)]
    assert not wrong, "queries use labels their metrics do not carry:\n" + "\n".join(wrong)


def test_promql_helpers_find_names_and_labels():
    """The extraction the checks above rely on, on a hand-worked query."""
    expr = ('histogram_quantile(0.99, sum by (le, stage) (rate(pixelprune_stage_duration_seconds_bucket'
            '{namespace=~"a|b", stage="vit"}[5m]))) / on (pod) group_left max(up{job="x"} offset 1h) > 1e3')
    assert promql_identifiers(expr) == ({"pixelprune_stage_duration_seconds_bucket", "up"},
                                        {"histogram_quantile", "sum", "rate", "max"})
    assert promql_label_names(expr) == {"le", "stage", "namespace", "pod", "job"}


def test_functions_are_promql_functions(rules, dashboard):
    for where, expr in all_queries(rules, dashboard):
        unknown = promql_identifiers(expr)[1] - PROMQL_FUNCTIONS
        assert not unknown, f"{where}: unknown functions {unknown}"


def test_status_codes_in_queries_are_grpc_codes(rules, dashboard):
    names = {code.name for code in grpc.StatusCode}
    for where, expr in all_queries(rules, dashboard):
        for value in re.findall(r'code\s*(?:=~|!~|!=|=)\s*"([^"]*)"', expr):
            assert set(value.split("|")) <= names, f"{where}: {value}"


def test_rules_pass_promtool_check(rules, tmp_path):
    promtool = require_tool("promtool", PROMTOOL_INSTALL)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert REQUIRED_ALERTS <= alerts
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_queries_are_valid_promql(dashboard, tmp_path):
    """Each panel query, with Grafana's variables filled in, as a recording rule for promtool."""
    promtool = require_tool("promtool", PROMTOOL_INSTALL)
    records = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
               for i, (_, expr) in enumerate(panel_queries(dashboard))]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_structure(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= set(variables)
    for name in ("namespace", "pod"):
        assert all(f'{name}=~"${name}"' in expr for _, expr in panel_queries(dashboard) if "pixelprune_" in expr)


def test_dashboard_shows_every_required_view(dashboard):
    """TTFT quantiles, codes, pruning, KV cache, stages, queue, cache hit rate, Redis."""
    text = " ".join(expr for _, expr in panel_queries(dashboard))
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(pixelprune_ttft_seconds_bucket" in text
    for needle in ("sum by (code) (rate(pixelprune_request_duration_seconds_count", 'code!="OK"',
                   "pixelprune_retain_ratio", "sum by (kind) (rate(pixelprune_visual_tokens_total",
                   "pixelprune_kv_cache_bytes", "pixelprune_kv_cache_in_use_bytes", 'stage=~"select|vit|prefill"',
                   "pixelprune_queue_depth", "pixelprune_queue_wait_seconds", "pixelprune_changed_block_fraction",
                   "pixelprune_redis_errors_total"):
        assert needle in text, needle
    hit_rate = [e for _, e in panel_queries(dashboard) if "pixelprune_frame_cache_hits_total" in e]
    assert hit_rate and all(re.search(r"hits_total.*\)\s*/\s*sum\(.*queries_total", e) for e in hit_rate)


def test_dashboard_is_provisioned_by_a_labelled_configmap(dashboard):
    (configmap,) = kustomize(K8S / "grafana")
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = configmap["data"].values()
    assert json.loads(content) == dashboard
    # kubectl apply keeps a copy in an annotation, limited to 256 KiB.
    assert len(content.encode()) < 262144
    kubernetes_validate.validate(configmap, "1.37.0", strict=True)


def test_adapter_rule_configmap_is_valid():
    (configmap,) = kustomize(K8S / "monitoring")
    kubernetes_validate.validate(configmap, "1.37.0", strict=True)
    (rule,) = adapter_config()["rules"]
    assert rule["seriesQuery"].startswith("pixelprune_queue_depth{")


def test_overview_panels_read_zero_not_no_data(dashboard, tmp_path):
    """Replicas up, requests/s and the server error ratio evaluated by promtool on series as the
    service exports them (every code present from the start): 0 with no traffic or no replica up,
    the right values with traffic."""
    from service.metrics import CODES

    promtool = require_tool("promtool", PROMTOOL_INSTALL)
    panels = {p["title"]: grafana_to_promql(p["targets"][0]["expr"])
              for p in dashboard["panels"] if p["type"] != "row"}
    target = 'job="pixelprune", namespace="prod", pod="a"'

    def exported(unary: dict, frames: dict, up: str) -> list[dict]:
        out = [{"series": f"up{{{target}}}", "values": up}]
        for code in CODES:
            unary_series = f'pixelprune_request_duration_seconds_count{{{target}, rpc="Ground", code="{code}"}}'
            out.append({"series": unary_series, "values": f"0+{unary.get(code, 0)}x20"})
            out.append({"series": f'pixelprune_stream_frame_duration_seconds_count{{{target}, code="{code}"}}',
                        "values": f"0+{frames.get(code, 0)}x20"})
        return out

    def reads(values: dict) -> list[dict]:
        return [{"expr": panels[title], "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": value}]}
                for title, value in values.items()]

    tests = [
        {"interval": "1m", "input_series": exported({}, {}, "0x20"),
         "promql_expr_test": reads({"Replicas up": 0, "Requests / s": 0, "Server error ratio": 0})},
        {"interval": "1m", "input_series": exported({"OK": 60, "INTERNAL": 6}, {"OK": 30, "INTERNAL": 4}, "1x20"),
         "promql_expr_test": reads({"Replicas up": 1, "Requests / s": 100 / 60, "Server error ratio": 0.1})},
    ]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m",
                                                         "tests": tests}))
    out = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
