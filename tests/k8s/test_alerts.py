"""The alert logic, exercised with `promtool test rules` on synthetic series.

Each case feeds minute-by-minute samples of the service's metrics (names and
labels as the service exports them, plus the target labels Prometheus adds)
and states which alerts fire, with which labels, at a given time. Annotations
are left out of the rules under test: they are text, checked by
`promtool check rules` in test_monitoring.py.
"""

from __future__ import annotations

import subprocess

import yaml

from k8s_tools import K8S, kustomize, one, require_tool

T = 'job="pixelprune", namespace="prod"'  # target labels of every series below


def series(labels: str, values: str) -> dict:
    return {"series": labels, "values": values}


def alert_case(eval_time: str, alertname: str, *alerts: dict) -> dict:
    return {"eval_time": eval_time, "alertname": alertname, "exp_alerts": [{"exp_labels": a} for a in alerts]}


def ttft_buckets(per_minute_in_5s_bucket: int) -> list[dict]:
    """TTFT histogram whose observations all fall between 2.5 s and 5 s (p99 ~ 4.98 s)."""
    name = "pixelprune_ttft_seconds_bucket"
    return [series(f'{name}{{{T}, pod="a", le="1"}}', "0x30"),
            series(f'{name}{{{T}, pod="a", le="2.5"}}', "0x30"),
            series(f'{name}{{{T}, pod="a", le="5"}}', f"0+{per_minute_in_5s_bucket}x30"),
            series(f'{name}{{{T}, pod="a", le="+Inf"}}', f"0+{per_minute_in_5s_bucket}x30")]


def requests(code: str, per_minute: int, namespace: str = "prod") -> dict:
    labels = f'job="pixelprune", namespace="{namespace}", pod="a", rpc="Ground", code="{code}"'
    return series(f"pixelprune_request_duration_seconds_count{{{labels}}}", f"0+{per_minute}x30")


TESTS = [
    {   # 10% INTERNAL in prod fires; in dev only client errors (INVALID_ARGUMENT) and refusals: no error alert.
        "interval": "1m",
        "input_series": [requests("OK", 90), requests("INTERNAL", 10),
                         requests("OK", 50, "dev"), requests("INVALID_ARGUMENT", 50, "dev"),
                         requests("RESOURCE_EXHAUSTED", 60, "dev")],
        "alert_rule_test": [
            alert_case("3m", "PixelPruneHighErrorRate"),  # not yet: `for: 5m`
            alert_case("15m", "PixelPruneHighErrorRate", {"severity": "critical", "namespace": "prod"}),
            alert_case("15m", "PixelPruneRequestsRejected", {"severity": "warning", "namespace": "dev"}),
        ],
    },
    {   # p99 TTFT ~5 s > 2 s for 10 minutes.
        "interval": "1m",
        "input_series": ttft_buckets(30),
        "alert_rule_test": [
            alert_case("5m", "PixelPruneTTFTP99High"),
            alert_case("20m", "PixelPruneTTFTP99High", {"severity": "warning", "namespace": "prod"}),
        ],
    },
    {   # Queues 7/8 full in prod, 3/8 in dev; Redis failing on pod a only.
        "interval": "1m",
        "input_series": [
            series(f'pixelprune_queue_depth{{{T}, pod="a"}}', "7x30"),
            series(f'pixelprune_queue_depth{{{T}, pod="b"}}', "6x30"),
            series('pixelprune_queue_depth{job="pixelprune", namespace="dev", pod="c"}', "3x30"),
            series(f'pixelprune_redis_errors_total{{{T}, pod="a"}}', "0+4x30"),
            series(f'pixelprune_redis_errors_total{{{T}, pod="b"}}', "0x30"),
        ],
        "alert_rule_test": [
            alert_case("20m", "PixelPruneQueueSaturated", {"severity": "warning", "namespace": "prod"}),
            alert_case("20m", "PixelPruneRedisErrors", {"severity": "warning", "namespace": "prod", "pod": "a"}),
        ],
    },
    {   # One of two replicas stops answering scrapes; later every replica does.
        "interval": "1m",
        "input_series": [series(f'up{{{T}, pod="a"}}', "1x30"), series(f'up{{{T}, pod="b"}}', "0x30"),
                         series(f'up{{{T}, pod="c"}}', "1x9 0x20")],
        "alert_rule_test": [
            alert_case("8m", "PixelPruneReplicaDown",
                       {"severity": "warning", "job": "pixelprune", "namespace": "prod", "pod": "b"}),
            alert_case("8m", "PixelPruneAllReplicasDown"),
        ],
    },
    {
        "interval": "1m",
        "input_series": [series(f'up{{{T}, pod="a"}}', "0x10")],
        "alert_rule_test": [
            alert_case("5m", "PixelPruneAllReplicasDown", {"severity": "critical"}),
        ],
    },
]


def test_alerts_fire_exactly_when_they_should(tmp_path):
    promtool = require_tool("promtool", "apt-get install prometheus (Debian package providing promtool)")
    spec = one(kustomize(K8S / "overlays" / "gpu"), "PrometheusRule")["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    tested = {case["alertname"] for test in TESTS for case in test["alert_rule_test"]}
    assert tested == {r["alert"] for g in spec["groups"] for r in g["rules"]}, "every alert has a case"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": TESTS}))
    out = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
