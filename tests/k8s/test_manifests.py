"""The Kubernetes manifests: both overlays render, every object validates, and
the wiring between objects and the service is right (ports, probes, settings,
Secret, Redis, autoscaling, disruption budget).
"""

from __future__ import annotations

import shlex
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from k8s_tools import K8S, OVERLAYS, SCHEMAS, crd_schema, kustomize, one

# Kubernetes versions whose offline schemas kubernetes-validate ships: the
# oldest one we support (gRPC probes are GA since 1.27) and the newest.
K8S_VERSIONS = ("1.30.0", "1.37.0")
EXPECTED_KINDS = {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget",
                  "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, kustomize(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def rendered():
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def server_container(objects) -> dict:
    spec = one(objects, "Deployment", "pixelprune")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "pixelprune"]
    return container


def settings(objects) -> dict[str, str]:
    return one(objects, "ConfigMap", "pixelprune-config")["data"]


def test_overlays_render_every_kind(overlay):
    name, objects = overlay
    kinds = {o["kind"] for o in objects}
    assert EXPECTED_KINDS <= kinds
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        one(objects, "Namespace")["metadata"]["name"]}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_pass_kubernetes_validate_strict(rendered, version):
    for name, objects in rendered.items():
        for obj in objects:
            if (obj["apiVersion"], obj["kind"]) in SCHEMAS:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} (k8s {version}): {exc.message} "
                            f"at {list(exc.path)}")


def test_crd_objects_match_published_schemas(rendered):
    checked = set()
    for objects in rendered.values():
        for obj in objects:
            key = (obj["apiVersion"], obj["kind"])
            if key in SCHEMAS:
                jsonschema.Draft7Validator(crd_schema(*key)).validate(obj)
                checked.add(key)
    assert checked == set(SCHEMAS)


def test_crd_schema_check_rejects_undeclared_and_wrong_fields(rendered):
    """The CRD check can fail: a misspelt field and a bad duration are refused."""
    monitor = one(rendered["gpu"], "ServiceMonitor")
    validator = jsonschema.Draft7Validator(crd_schema(monitor["apiVersion"], monitor["kind"]))
    typo = yaml.safe_load(yaml.safe_dump(monitor))
    typo["spec"]["endpoints"][0]["intervall"] = "15s"
    assert not validator.is_valid(typo)
    bad = yaml.safe_load(yaml.safe_dump(monitor))
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert not validator.is_valid(bad)
    rule = one(rendered["gpu"], "PrometheusRule")
    no_expr = yaml.safe_load(yaml.safe_dump(rule))
    del no_expr["spec"]["groups"][0]["rules"][0]["expr"]
    assert not jsonschema.Draft7Validator(crd_schema(rule["apiVersion"], rule["kind"])).is_valid(no_expr)


def test_ports_and_probes_match_the_service(overlay):
    from service.config import ServiceConfig

    _, objects = overlay
    defaults, env, container = ServiceConfig(), settings(overlay[1]), server_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": defaults.port, "metrics": defaults.metrics_port, "health": 50061}
    assert int(env["PIXELPRUNE_PORT"]) == ports["grpc"] and int(env["PIXELPRUNE_METRICS_PORT"]) == ports["metrics"]
    assert int(env["PIXELPRUNE_HEALTH_PORT"]) == ports["health"]
    assert env["PIXELPRUNE_HOST"] == "0.0.0.0", "kubelet probes and the Service reach the pod IP"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]  # grpc.health.v1 Check, on the health-only server
        assert grpc_probe["port"] == ports["health"] and grpc_probe.get("service", "") == ""
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load may take minutes"
    service = one(objects, "Service", "pixelprune")  # the health port is for the kubelet only
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"grpc": "grpc", "metrics": "metrics"}
    monitor = one(objects, "ServiceMonitor")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_service_links_cannot_shadow_settings(overlay):
    """A Service named `pixelprune` would inject PIXELPRUNE_PORT=tcp://<ip>:50051 into the pod."""
    _, objects = overlay
    pod = one(objects, "Deployment", "pixelprune")["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    assert one(objects, "Service", "pixelprune")


def test_health_and_reflection_need_no_token():
    """Kubelet's gRPC probe sends no metadata: the auth interceptor must let health through."""
    from service.auth import OPEN_SERVICE_PREFIXES

    assert any("/grpc.health.v1.Health/Check".startswith(p) for p in OPEN_SERVICE_PREFIXES)


def test_configmap_holds_only_real_flags_and_the_service_accepts_it(overlay, tmp_path):
    import argparse

    from service.config import add_arguments, env_name, from_args_and_env

    _, objects = overlay
    env = settings(objects)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    known = {env_name(flag) for action in parser._actions for flag in action.option_strings if flag.startswith("--")}
    unknown = {k for k in env if k.startswith("PIXELPRUNE_")} - known
    assert not unknown, f"settings no flag reads (typos are silently ignored): {unknown}"
    token = tmp_path / "token"
    token.write_text("test-token\n")
    config = from_args_and_env([], {**env, "PIXELPRUNE_AUTH_TOKEN_FILE": str(token)})
    assert config.port == int(env["PIXELPRUNE_PORT"]) and config.queue_size == int(env["PIXELPRUNE_QUEUE_SIZE"])
    assert config.spec.model == env["PIXELPRUNE_MODEL"] and config.redis_url == env["PIXELPRUNE_REDIS_URL"]


def test_auth_token_secret_is_mounted_at_the_token_file(overlay):
    name, objects = overlay
    container, env = server_container(objects), settings(objects)
    pod = one(objects, "Deployment", "pixelprune")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"].startswith("pixelprune-auth")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    (item,) = volume["secret"]["items"]
    assert f"{mount['mountPath']}/{item['path']}" == env["PIXELPRUNE_AUTH_TOKEN_FILE"]
    assert mount["readOnly"] is True
    if name == "cpu-dev":  # generated; production creates the Secret itself (k8s/README.md)
        secret = one(objects, "Secret", "pixelprune-auth")
        assert secret["metadata"]["name"] == volume["secret"]["secretName"] and item["key"] in secret["data"]


def test_termination_grace_covers_prestop_and_drain(overlay):
    from service.config import ServiceConfig

    _, objects = overlay
    pod = one(objects, "Deployment", "pixelprune")["spec"]["template"]["spec"]
    container, env = server_container(objects), settings(objects)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    delay = float(env.get("PIXELPRUNE_DRAIN_DELAY_S", ServiceConfig().drain_delay_s))
    drain = float(env.get("PIXELPRUNE_DRAIN_GRACE_S", ServiceConfig().drain_grace_s))
    assert delay > 0, "probes must see NOT_SERVING before the listener closes"
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + delay + drain


def test_shm_is_memory_backed_and_root_filesystem_read_only(overlay):
    _, objects = overlay
    pod = one(objects, "Deployment", "pixelprune")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in server_container(objects)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert server_container(objects)["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_gpu_overlay_requests_a_gpu_and_a_shared_model_cache(rendered):
    objects = rendered["gpu"]
    container, env = server_container(objects), settings(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = one(objects, "Deployment", "pixelprune")["spec"]["template"]["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    claim = one(objects, "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model-cache")
    assert env["HF_HOME"].startswith(mount["mountPath"] + "/")
    assert env["PIXELPRUNE_DEVICE"] == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_cpu_dev_overlay_serves_the_tiny_checkpoint_without_gpu(rendered):
    objects = rendered["cpu-dev"]
    container, env = server_container(objects), settings(objects)
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    pod = one(objects, "Deployment", "pixelprune")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    command = init["command"]
    assert command[:2] == ["pixelprune", "tiny-checkpoint"] and command[2] == env["PIXELPRUNE_MODEL"]
    assert init["image"] == container["image"] and container["image"].endswith("-cpu")
    init_mount = next(m for m in init["volumeMounts"] if env["PIXELPRUNE_MODEL"].startswith(m["mountPath"] + "/"))
    server_mount = next(m for m in container["volumeMounts"] if m["name"] == init_mount["name"])
    assert server_mount["mountPath"] == init_mount["mountPath"]
    volume = next(v for v in pod["volumes"] if v["name"] == init_mount["name"])
    assert set(volume) == {"name", "emptyDir"}
    assert env["PIXELPRUNE_DEVICE"] == "cpu"


def test_redis_url_names_the_statefulset_pod_and_redis_is_a_bounded_lru_cache(overlay):
    _, objects = overlay
    url = urlparse(settings(objects)["PIXELPRUNE_REDIS_URL"])
    pod_name, _, service_name = url.hostname.partition(".")
    statefulset = one(objects, "StatefulSet", "pixelprune-redis")
    service = one(objects, "Service", service_name)
    assert statefulset["spec"]["serviceName"] == service_name and service["spec"]["clusterIP"] == "None"
    assert pod_name == f"{statefulset['metadata']['name']}-0"
    assert url.port == service["spec"]["ports"][0]["port"]
    redis = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert redis["ports"][0]["containerPort"] == url.port
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    args = dict(zip(redis["args"][::2], redis["args"][1::2]))
    assert args["--maxmemory-policy"] == "allkeys-lru" and args["--save"] == ""
    maxmemory_mib = int(args["--maxmemory"].removesuffix("mb"))
    limit_mib = int(redis["resources"]["limits"]["memory"].removesuffix("Mi"))
    assert maxmemory_mib < limit_mib, "Redis must evict before the kernel kills it"


def test_selectors_of_service_pdb_and_hpa_reach_the_server_pods(overlay):
    _, objects = overlay
    deployment = one(objects, "Deployment", "pixelprune")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert one(objects, "Service", "pixelprune")["spec"]["selector"].items() <= labels.items()
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"


def test_hpa_metric_is_produced_by_the_adapter_rule(overlay):
    """The HPA's Pods metric name is what prometheus-adapter's rule renames pixelprune_queue_depth to."""
    import re

    _, objects = overlay
    hpa = one(objects, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    adapter = one(kustomize(K8S / "monitoring"), "ConfigMap", "pixelprune-prometheus-adapter")
    produced = {}
    for rule in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]:
        series = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)", rule["seriesQuery"]).group(1)
        assert re.search(rule["name"]["matches"], series), f"rule's `matches` does not match {series}"
        produced[re.sub(rule["name"]["matches"], rule["name"]["as"], series)] = rule
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(
            re.findall(r"<<\.\w+>>", rule["metricsQuery"]))
    assert metric["pods"]["metric"]["name"] in produced
    assert float(metric["pods"]["target"]["averageValue"]) < int(settings(objects)["PIXELPRUNE_QUEUE_SIZE"])


def test_queue_alert_threshold_follows_the_queue_size(overlay):
    """Each overlay's QueueSaturated threshold is 3/4 of its queue size, so the alert can fire."""
    _, objects = overlay
    rules = {r["alert"]: r for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    threshold = float(shlex.split(rules["PixelPruneQueueSaturated"]["expr"])[-1])
    assert threshold == 0.75 * int(settings(objects)["PIXELPRUNE_QUEUE_SIZE"])
    assert f"queue size {settings(objects)['PIXELPRUNE_QUEUE_SIZE']}" in \
        rules["PixelPruneQueueSaturated"]["annotations"]["description"]


# Bytes a pixel in flight may cost the pod's memory (README: "Sizing --max-inflight-pixels"): on
# CPU the decoded and resized uint8 copies and the float32 rows; on CUDA the rows are on the GPU.
BYTES_PER_PIXEL = {"cpu": 30, "cuda": 7}
IDLE_ALLOWANCE = {"cpu": 1 << 30, "cuda": 6 << 30}  # the loaded model, torch, CUDA context: bytes


def test_pixel_budget_fits_the_memory_limit(overlay):
    from service.config import ServiceConfig

    _, objects = overlay
    env, container = settings(objects), server_container(objects)
    budget = int(env["PIXELPRUNE_MAX_INFLIGHT_PIXELS"])
    assert budget >= int(env.get("PIXELPRUNE_MAX_IMAGE_PIXELS", ServiceConfig().max_image_pixels))
    limit = container["resources"]["limits"]["memory"]
    limit_bytes = int(limit.removesuffix("Gi")) << 30
    device = env["PIXELPRUNE_DEVICE"]
    assert budget * BYTES_PER_PIXEL[device] + IDLE_ALLOWANCE[device] <= limit_bytes
