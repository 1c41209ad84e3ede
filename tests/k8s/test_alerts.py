"""The alert logic, exercised with `promtool test rules` on synthetic series.

Each case feeds minute-by-minute samples of the service's metrics (names and
labels as the service exports them, plus the target labels Prometheus adds)
and states which alerts fire, with which labels, at a given time. Annotations
are left out of the rules under test: they are text, checked by
`promtool check rules` in test_monitoring.py.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from k8s_tools import K8S, OVERLAYS, kustomize, one, require_tool
from service.metrics import CODES

T = 'job="pixelprune", namespace="prod"'  # target labels of every series below


def series(labels: str, values: str) -> dict:
    return {"series": labels, "values": values}


def alert_case(eval_time: str, alertname: str, *alerts: dict) -> dict:
    return {"eval_time": eval_time, "alertname": alertname, "exp_alerts": [{"exp_labels": a} for a in alerts]}


def ttft_buckets(per_minute: int, bounds: tuple[str, str] = ("2.5", "5")) -> list[dict]:
    """TTFT histogram whose observations all fall between bounds[0] and bounds[1] seconds
    (2.5 and 5: p99 ~ 4.98 s; 25 and 60: p99 ~ 59.7 s)."""
    name = "pixelprune_ttft_seconds_bucket"
    return [series(f'{name}{{{T}, pod="a", le="1"}}', "0x30"),
            series(f'{name}{{{T}, pod="a", le="{bounds[0]}"}}', "0x30"),
            series(f'{name}{{{T}, pod="a", le="{bounds[1]}"}}', f"0+{per_minute}x30"),
            series(f'{name}{{{T}, pod="a", le="+Inf"}}', f"0+{per_minute}x30")]


def traffic(namespace: str = "prod", unary: dict | None = None, frames: dict | None = None) -> list[dict]:
    """Ground calls and GroundStream frames per minute by code, with every code's series present
    from the start (at 0), as the service exports them."""
    out = []
    for code in CODES:
        labels = f'job="pixelprune", namespace="{namespace}", pod="a", code="{code}"'
        out.append(series(f'pixelprune_request_duration_seconds_count{{{labels}, rpc="Ground"}}',
                          f"0+{(unary or {}).get(code, 0)}x30"))
        out.append(series(f"pixelprune_stream_frame_duration_seconds_count{{{labels}}}",
                          f"0+{(frames or {}).get(code, 0)}x30"))
    return out


COMMON_TESTS = [
    {   # 10% INTERNAL in prod fires; in dev only client errors (INVALID_ARGUMENT) and refusals: no error alert.
        "interval": "1m",
        "input_series": traffic("prod", {"OK": 90, "INTERNAL": 10})
        + traffic("dev", {"OK": 50, "INVALID_ARGUMENT": 50, "RESOURCE_EXHAUSTED": 60}),
        "alert_rule_test": [
            alert_case("3m", "PixelPruneHighErrorRate"),  # not yet: `for: 5m`
            alert_case("15m", "PixelPruneHighErrorRate", {"severity": "critical", "namespace": "prod"}),
            alert_case("15m", "PixelPruneRequestsRejected", {"severity": "warning", "namespace": "dev"}),
        ],
    },
    {   # Stream frames count like calls: 10% of all requests in prod are frames that ended INTERNAL; in
        # dev, stream frames refused for device memory; in test, unary calls only, all fine.
        "interval": "1m",
        "input_series": traffic("prod", {"OK": 60}, {"OK": 30, "INTERNAL": 10})
        + traffic("dev", {"OK": 10}, {"RESOURCE_EXHAUSTED": 30}) + traffic("test", {"OK": 10}),
        "alert_rule_test": [
            alert_case("15m", "PixelPruneHighErrorRate", {"severity": "critical", "namespace": "prod"}),
            alert_case("15m", "PixelPruneRequestsRejected", {"severity": "warning", "namespace": "dev"}),
        ],
    },
    {   # Redis failing on pod a only.
        "interval": "1m",
        "input_series": [
            series(f'pixelprune_redis_errors_total{{{T}, pod="a"}}', "0+4x30"),
            series(f'pixelprune_redis_errors_total{{{T}, pod="b"}}', "0x30"),
        ],
        "alert_rule_test": [
            alert_case("20m", "PixelPruneRedisErrors", {"severity": "warning", "namespace": "prod", "pod": "a"}),
        ],
    },
    {   # Pod a's engine stops making progress (health NOT_SERVING); pod b stalls for a minute only.
        "interval": "1m",
        "input_series": [
            series(f'pixelprune_stalled{{{T}, pod="a", reason="engine_no_progress"}}', "0x5 1x25"),
            series(f'pixelprune_stalled{{{T}, pod="a", reason="queue_no_progress"}}', "0x30"),
            series(f'pixelprune_stalled{{{T}, pod="b", reason="engine_no_progress"}}', "0x5 1 0x24"),
        ],
        "alert_rule_test": [
            alert_case("6m", "PixelPruneStalled"),  # not yet: `for: 2m`
            alert_case("10m", "PixelPruneStalled", {"severity": "critical", "namespace": "prod", "pod": "a",
                                                    "reason": "engine_no_progress"}),
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


def thresholds(ttft_fires: tuple[str, str], ttft_quiet: tuple[str, str] | None, depth_fires: int,
               depth_quiet: int) -> list[dict]:
    """Cases for one overlay's TTFT and queue thresholds: a value just above fires, one below does not."""
    quiet_ns = 'job="pixelprune", namespace="quiet"'
    cases = [{
        "interval": "1m",
        "input_series": ttft_buckets(30, ttft_fires),
        "alert_rule_test": [
            alert_case("5m", "PixelPruneTTFTP99High"),
            alert_case("20m", "PixelPruneTTFTP99High", {"severity": "warning", "namespace": "prod"}),
        ],
    }, {
        "interval": "1m",
        "input_series": [series(f'pixelprune_queue_depth{{{T}, pod="a"}}', f"{depth_fires}x30"),
                         series(f'pixelprune_queue_depth{{{quiet_ns}, pod="c"}}', f"{depth_quiet}x30")],
        "alert_rule_test": [
            alert_case("20m", "PixelPruneQueueSaturated", {"severity": "warning", "namespace": "prod"}),
        ],
    }]
    if ttft_quiet is not None:
        cases.append({"interval": "1m", "input_series": ttft_buckets(30, ttft_quiet),
                      "alert_rule_test": [alert_case("20m", "PixelPruneTTFTP99High")]})
    return cases


TESTS = {  # overlay -> cases; thresholds: gpu p99 TTFT > 2 s and queue >= 6 of 8; cpu-dev > 20 s and >= 3 of 4
    "gpu": COMMON_TESTS + thresholds(("2.5", "5"), None, 6, 5),
    "cpu-dev": COMMON_TESTS + thresholds(("25", "60"), ("2.5", "5"), 3, 2),
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alerts_fire_exactly_when_they_should(tmp_path, overlay):
    promtool = require_tool("promtool", "apt-get install prometheus (Debian package providing promtool)")
    spec = one(kustomize(K8S / "overlays" / overlay), "PrometheusRule")["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    tests = TESTS[overlay]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert tested == {r["alert"] for g in spec["groups"] for r in g["rules"]}, "every alert has a case"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    out = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
