"""The Kubernetes manifests (deploy/kubernetes): both overlays render with `kubectl kustomize`, every object
validates against the Kubernetes schemas (kubernetes-validate bundles them), and the objects say what the
deployment relies on: probes on the gRPC health service, selectors that match, the gateway's discovery name
is a headless Service of the right compute pods, network policies that let only the gateway reach compute and
only compute and the gateway reach the store, commands our CLI accepts, and a GPU only in the gpu overlay."""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hmi.cli import build_parser
from hmi.launcher import ServiceSet
from services.common.discovery import parse_target

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
SCHEMA_VERSION = "1.30.0"       # gRPC probes are GA since 1.27; validate against an older release still served
WORKLOADS = ("Deployment", "StatefulSet")

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl is not installed: the manifests cannot be rendered")


def render(overlay: str) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(KUBERNETES / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def component(workload: dict) -> str:
    return pod_labels(workload)["app.kubernetes.io/component"]


def test_every_rendered_object_validates_against_the_kubernetes_schemas(rendered):
    import kubernetes_validate
    _, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "Secret", "ConfigMap"} <= kinds
    for obj in objects:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
    broken = copy.deepcopy(of_kind(objects, "Deployment")["gateway"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["service_name"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, SCHEMA_VERSION, strict=True)


def test_every_container_has_grpc_probes_resources_and_runs_as_non_root(rendered):
    _, objects = rendered
    readiness = {"store": "hmi.v1.KnowledgeStore", "compute": "hmi.v1.Compute", "gateway": "hmi.v1.Gateway"}
    workloads = [o for o in objects if o["kind"] in WORKLOADS]
    assert sorted(component(w) for w in workloads) == ["compute", "compute", "gateway", "store"]
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            ports = {p["containerPort"] for p in container["ports"]}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                grpc_probe = container[probe]["grpc"]
                assert grpc_probe["port"] in ports, f"{workload['metadata']['name']}: {probe} on no port it opens"
            assert container["livenessProbe"]["grpc"]["service"] == "liveness"
            assert container["readinessProbe"]["grpc"]["service"] == readiness[component(workload)]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def test_selectors_of_services_budgets_and_autoscalers_match_their_pods(rendered):
    _, objects = rendered
    workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOADS}
    for workload in workloads.values():
        assert matches(workload["spec"]["selector"]["matchLabels"], pod_labels(workload))
    services = of_kind(objects, "Service")
    for name, service in services.items():
        selected = [w for w in workloads.values() if matches(service["spec"]["selector"], pod_labels(w))]
        assert len(selected) == 1, f"Service {name} selects {[w['metadata']['name'] for w in selected]}"
        target_ports = {p["targetPort"] for p in service["spec"]["ports"]}
        named = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert target_ports <= named, f"Service {name} points at ports its pods do not name"
    store = workloads["store"]
    assert store["kind"] == "StatefulSet" and store["spec"]["replicas"] == 1
    assert services[store["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    assert store["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in store["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        if m["mountPath"] == "/data"}
    budgets = of_kind(objects, "PodDisruptionBudget")
    for budget in budgets.values():
        assert any(matches(budget["spec"]["selector"]["matchLabels"], pod_labels(w)) for w in workloads.values())
    scalers = of_kind(objects, "HorizontalPodAutoscaler")
    computes = {n for n, w in workloads.items() if component(w) == "compute"}
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scalers.values()} == computes
    assert computes | {"gateway"} <= set(budgets)


def args_of(workload: dict) -> list[str]:
    return workload["spec"]["template"]["spec"]["containers"][0]["args"]


def flag_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == flag]


def test_the_gateway_discovers_each_models_compute_pods_through_a_headless_service(rendered):
    _, objects = rendered
    services = of_kind(objects, "Service")
    deployments = of_kind(objects, "Deployment")
    gateway = args_of(deployments["gateway"])
    routes = dict(route.split("=", 1) for route in flag_values(gateway, "--compute"))
    assert set(routes) == set(flag_values(gateway, "--model")) == {"minilm", "smollm2"}
    for model, target_text in routes.items():
        target = parse_target(target_text)
        assert target_text.startswith("dns:///") and not target.is_address
        service = services[target.host]
        assert service["spec"]["clusterIP"] == "None", f"{target.host} must be headless: one address per pod"
        assert target.port in {p["port"] for p in service["spec"]["ports"]}
        pods = [d for d in deployments.values() if matches(service["spec"]["selector"], pod_labels(d))]
        assert len(pods) == 1 and flag_values(args_of(pods[0]), "--model") == [model]
        assert f"0.0.0.0:{target.port}" in flag_values(args_of(pods[0]), "--listen")
    store = parse_target(flag_values(gateway, "--store")[0])
    assert store.host in services


def allowed_sources(objects: list[dict], target: dict, port: int) -> set[str]:
    """Components whose pods may open a connection to `target`'s pods on `port` (`*`: any pod)."""
    policies = [p for p in of_kind(objects, "NetworkPolicy").values()
                if not p["spec"]["podSelector"] or matches(p["spec"]["podSelector"]["matchLabels"],
                                                           pod_labels(target))]
    assert any(not p["spec"].get("ingress") for p in policies), "no default deny covers these pods"
    sources: set[str] = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if port not in {p["port"] for p in rule.get("ports", [])}:
                continue
            if "from" not in rule:
                sources.add("*")
            for peer in rule["from"] if "from" in rule else []:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    sources.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
                else:
                    sources.add("other namespace")
    return sources


def test_network_policies_let_only_the_gateway_reach_compute_and_only_compute_and_gateway_the_store(rendered):
    _, objects = rendered
    workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOADS}
    for name, workload in workloads.items():
        kind = component(workload)
        port = workload["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        expected = {"store": {"compute", "gateway"}, "compute": {"gateway"}, "gateway": {"*"}}[kind]
        assert allowed_sources(objects, workload, port) == expected, name
        assert allowed_sources(objects, workload, 9090) == {"other namespace"}, "metrics: Prometheus only"


def test_commands_are_hmi_serve_commands_the_tests_start(rendered, tmp_path):
    _, objects = rendered
    launched = {service.name.split("-")[0]: service.args
                for service in ServiceSet.on_free_ports(tmp_path, model="minilm,smollm2").plan()}
    parser = build_parser()
    for workload in (o for o in objects if o["kind"] in WORKLOADS):
        args = args_of(workload)
        kind = component(workload)
        assert args[:2] == ["serve", kind] and parser.parse_args(args).service == kind
        flags = {arg for arg in args if arg.startswith("--")}
        assert flags <= {arg for arg in launched[kind] if arg.startswith("--")}, f"{kind}: flags never tested"


def test_only_the_gpu_overlay_asks_for_gpus_and_only_for_compute(rendered):
    overlay, objects = rendered
    for workload in (o for o in objects if o["kind"] in WORKLOADS):
        container = workload["spec"]["template"]["spec"]["containers"][0]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        wants = overlay == "gpu" and component(workload) == "compute"
        assert (gpus == "1") is wants, workload["metadata"]["name"]
        if component(workload) == "compute":
            assert env["HMI_DEVICE"] == ("cuda" if overlay == "gpu" else "cpu")
            assert int(env["HMI_TORCH_THREADS"]) <= float(container["resources"]["limits"]["cpu"])
        assert container["image"] == f"hmi:{overlay}"


def mounted_secret_files(objects: list[dict], workload: dict) -> dict[str, tuple[str, str]]:
    """Path in the container -> (the Secret object's name, its key), for the files of mounted Secrets."""
    secrets = of_kind(objects, "Secret")
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    files = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        source = volumes.get(mount["name"])
        if source is None:
            continue
        assert source["secretName"] in secrets, f"{mount['name']} mounts a Secret the manifests do not make"
        data = secrets[source["secretName"]].get("data", {})
        for item in source.get("items") or [{"key": key, "path": key} for key in data]:
            assert item["key"] in data
            files[f"{mount['mountPath']}/{item['path']}"] = (source["secretName"], item["key"])
    return files


def test_every_service_reads_the_service_secret_and_only_the_gateway_the_admin_token_from_a_secret(rendered):
    """Authentication is on, so a pod without its credentials would not start; secrets come from mounted files,
    never from environment variables or arguments."""
    _, objects = rendered
    for workload in (o for o in objects if o["kind"] in WORKLOADS):
        args = args_of(workload)
        files = mounted_secret_files(objects, workload)
        secret_file = flag_values(args, "--service-secret-file")
        assert len(secret_file) == 1 and files.get(secret_file[0], ("", ""))[1] == "service.secret", \
            workload["metadata"]["name"]
        token_file = flag_values(args, "--admin-token-file")
        if component(workload) == "gateway":
            assert len(token_file) == 1 and files.get(token_file[0], ("", ""))[1] == "admin.token"
        else:
            assert not token_file and not any(key == "admin.token" for _, key in files.values()), \
                f"{workload['metadata']['name']} needs no admin token"
        assert "--auth" not in args, "authentication stays on"
        env = workload["spec"]["template"]["spec"]["containers"][0].get("env", [])
        assert not {e["name"] for e in env} & {"HMI_SERVICE_SECRET", "HMI_ADMIN_TOKEN"}
