"""Kubernetes manifests (deploy/k8s/): schema, wiring between objects, and the routing / autoscaling configuration.

Every object is validated against the Kubernetes API models of the official Python client (generated from the
OpenAPI schema: unknown or misspelt fields, wrong types and missing required fields fail). The rest checks what a
schema cannot: selectors that match pod labels, Service target ports that exist, probes on Triton's health paths,
GPU limits, the HPA's target and metric, the Prometheus adapter rule behind that metric, and the HAProxy router:
its configuration is the rendering of liveportrait_triton.cluster (session-header hashing over the headless
Service), the one tests/test_cluster.py runs with real replicas.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes.client as k8s
import pytest
import yaml

from liveportrait_triton import spec
from liveportrait_triton.serve import DEFAULT_PORTS

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
SESSION_HEADER = spec.SESSION_HEADER
MODELS = {
    ("apps/v1", "Deployment"): k8s.V1Deployment,
    ("v1", "Service"): k8s.V1Service,
    ("v1", "ConfigMap"): k8s.V1ConfigMap,
    ("v1", "PersistentVolumeClaim"): k8s.V1PersistentVolumeClaim,
    ("policy/v1", "PodDisruptionBudget"): k8s.V1PodDisruptionBudget,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): k8s.V2HorizontalPodAutoscaler,
}


def load_objects() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc:
                objects.append({**doc, "_file": name})
    return objects


OBJECTS = load_objects()


def objects(kind: str) -> list[dict]:
    return [o for o in OBJECTS if o["kind"] == kind]


def named(kind: str, name: str) -> dict:
    found = [o for o in objects(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"listed {sorted(listed)}, present {sorted(present)}"


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['_file']}:{o['kind']}/{o['metadata']['name']}")
def test_object_matches_the_kubernetes_api_schema(obj):
    body = {k: v for k, v in obj.items() if k != "_file"}
    model = MODELS.get((body["apiVersion"], body["kind"]))
    assert model is not None, f"no schema for {body['apiVersion']} {body['kind']}: add its model to MODELS"
    model.model_validate(body)          # raises with the path of every offending field
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", body["metadata"]["name"])


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(deployment: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])}


@pytest.mark.parametrize("deployment", objects("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_deployment_selects_its_pods_and_pins_its_images(deployment):
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod.get("automountServiceAccountToken") is False
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for container in pod["containers"]:
        repository, _, tag = container["image"].rpartition(":")
        assert repository and tag and tag != "latest", f"{container['name']}: unpinned image {container['image']}"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert "ALL" in container["securityContext"]["capabilities"]["drop"]
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']} mounts undefined volume {mount['name']}"
        ports = {p["name"] for p in container.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container and "exec" not in container[probe]:
                handler = container[probe].get("httpGet") or container[probe].get("tcpSocket")
                assert handler["port"] in ports, f"{probe} uses port {handler['port']!r}, not one of {ports}"
    for claim in [v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]:
        named("PersistentVolumeClaim", claim)


def triton_deployment() -> dict:
    return named("Deployment", "liveportrait-triton")


def test_triton_pods_have_a_gpu_health_probes_and_the_entrypoint_settings():
    deployment = triton_deployment()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container_ports(deployment) == DEFAULT_PORTS
    # every probe runs the image's health check (Triton's endpoint plus the Python-backend stubs) on the HTTP port
    http_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    wanted = {"startupProbe": "ready", "readinessProbe": "ready", "livenessProbe": "live"}
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    for probe, kind in wanted.items():
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["python", "/opt/liveportrait/src/docker/healthcheck.py"], (probe, command)
        assert command[2:] == [kind, "--port", str(http_port)], (probe, command)
        assert command[1] in dockerfile, "the probe's script is where the image's HEALTHCHECK runs it"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60, "first start builds engines"
    entrypoint = (REPO / "docker" / "entrypoint.py").read_text()
    env = {e["name"]: e for e in container["env"]}
    unknown = sorted(n for n in env if n.startswith("LIVEPORTRAIT_") and n not in entrypoint)
    assert not unknown, f"the Deployment sets {unknown}, which docker/entrypoint.py never reads"
    assert (REPO / "docker" / "gpu-sharing" / env["LIVEPORTRAIT_GPU_PROFILE"]["value"]).is_file()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[env["LIVEPORTRAIT_WEIGHTS_DIR"]["value"]]["readOnly"] is True
    assert env["LIVEPORTRAIT_CACHE_DIR"]["value"] in mounts
    assert env["LIVEPORTRAIT_RUNTIME_DIR"]["value"].startswith("/tmp/") and "/tmp" in mounts
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    assert container["image"] == compose["services"]["triton"]["image"]
    assert deployment["spec"]["replicas"] >= 2


@pytest.mark.parametrize("service", objects("Service"), ids=lambda s: s["metadata"]["name"])
def test_service_selects_pods_whose_ports_it_targets(service):
    matched = [d for d in objects("Deployment") if selects(service["spec"]["selector"], pod_labels(d))]
    assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)} Deployments"
    ports = container_ports(matched[0])
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert target in ports or target in ports.values(), f"targetPort {target!r} is not a container port"
        assert port["port"] == ports.get(target, target)


def test_headless_service_lists_the_triton_replicas():
    headless = named("Service", "liveportrait-triton")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses", False) is False
    assert selects(headless["spec"]["selector"], pod_labels(triton_deployment()))


def test_disruption_budget_covers_the_triton_pods():
    (budget,) = objects("PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(triton_deployment()))


def adapter_rules() -> list[dict]:
    config = named("ConfigMap", "prometheus-adapter-liveportrait")["data"]["config.yaml"]
    return yaml.safe_load(config)["rules"]


def test_hpa_scales_the_triton_deployment_on_the_adapter_metric():
    (hpa,) = objects("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    deployment = triton_deployment()
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served
    down = hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    assert down >= 300, "streams are stateful: scale down slowly"


def test_adapter_rule_reads_triton_queue_time_of_the_gpu_networks():
    (rule,) = adapter_rules()
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert series == "nv_inference_queue_duration_us"
    assert re.fullmatch(rule["name"]["matches"], series)
    query = rule["metricsQuery"]
    assert "<<.GroupBy>>" in query and "<<.LabelMatchers>>" in query
    assert "rate(nv_inference_queue_duration_us{" in query and "rate(nv_inference_request_success{" in query
    for regex in set(re.findall(r'model=~"([^"]+)"', rule["seriesQuery"] + query)):
        assert set(regex.split("|")) == {spec.WARPING, spec.GENERATOR}
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"


def test_router_is_haproxy_with_the_rendering_the_cluster_tests_run():
    """The router's haproxy.cfg is render_proxy_config's output for the headless Service (tests/test_cluster.py
    runs the same function's loopback rendering with real replicas): session-header hashing, health checks."""
    from liveportrait_triton.cluster import KUBERNETES_REPLICAS, kubernetes_proxy_config
    config = named("ConfigMap", "liveportrait-router")["data"]["haproxy.cfg"]
    assert config == kubernetes_proxy_config(), (
        "deploy/k8s/router.yaml differs from the rendering: paste the output of `python -c \"from "
        "liveportrait_triton.cluster import kubernetes_proxy_config as k; print(k(), end='')\"` into it")
    triton_ports = container_ports(triton_deployment())
    assert (KUBERNETES_REPLICAS.grpc_port, KUBERNETES_REPLICAS.http_port) == (triton_ports["grpc"],
                                                                              triton_ports["http"])
    headless = named("Service", "liveportrait-triton")["metadata"]["name"]
    assert KUBERNETES_REPLICAS.hostname.startswith(f"{headless}.${{POD_NAMESPACE}}.svc.")
    (hpa,) = objects("HorizontalPodAutoscaler")
    assert KUBERNETES_REPLICAS.slots >= hpa["spec"]["maxReplicas"], "one proxy slot per replica the HPA may run"
    for kind in ("grpc", "http"):
        assert f"bind 0.0.0.0:{triton_ports[kind]}" in config and f"backend {kind}_replicas" in config
    assert config.count(f"balance hdr({SESSION_HEADER})") == 2 and config.count("hash-type consistent") == 2

    router = named("Deployment", "liveportrait-router")
    assert container_ports(router) == {"http": triton_ports["http"], "grpc": triton_ports["grpc"]}
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1] == container["volumeMounts"][0]["mountPath"] + "/haproxy.cfg"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    image, tag = container["image"].split(":")
    assert image == "haproxy"
    haproxy = shutil.which("haproxy")
    if haproxy:         # the image runs the HAProxy release the cluster tests ran
        version = subprocess.run([haproxy, "-v"], capture_output=True, text=True).stdout.split()[2]
        assert version.split("-")[0] == tag, f"the tests ran HAProxy {version}, the router runs {tag}"


def test_deploy_readme_documents_the_routing_and_failover():
    readme = (REPO / "deploy" / "README.md").read_text()
    for needle in (SESSION_HEADER, "liveportrait-triton", "liveportrait_queue_us_per_request", "START",
                   "kubectl apply"):
        assert needle in readme, needle
