"""The Kubernetes pipeline in real containers: the image built with podman, every pod's
command, arguments, environment, volumes and security settings taken from the rendered
manifests, each pod in its own network namespace.

No Kubernetes API server can run on these machines (docs/deploy.md), so this test plays
the kubelet and the Job controller, and nothing else: it renders tests/k8s/tiny (the cpu
overlay with a tiny job config) with ``kubectl kustomize``, and for each pod of a Job
resolves the container's env as the kubelet does (``value`` with ``$(VAR)`` expansion,
``fieldRef`` to the pod IP / labels / completion-index annotation, ``secretKeyRef``),
expands ``$(VAR)`` in command and args, mounts the ConfigMap, the two volumes (host
folders) and the emptyDirs (tmpfs), applies the pod's and container's securityContext
(non-root user, ``--cap-drop ALL``, no-new-privileges, read-only root, default seccomp),
runs the init containers to completion and then the main container, each on a podman
bridge network with its own IP and the Service / pod host names of the manifests. A failed
pod is judged by the Job's rendered podFailurePolicy and backoff limits, and replaced as
the Job controller would.

The run: pretraining (2 pods), which must equal the same pretraining on the host (metrics
and every tensor of the best checkpoint); then the Ray head and MoRec fine-tuning (2 pods,
which join the head's Ray cluster with the token from the Secret); as soon as the first
step checkpoint of fine-tuning exists, pod 1 is stopped as the kubelet stops a pod
(``podman stop -t terminationGracePeriodSeconds``: SIGTERM, the grace, SIGKILL). It must
checkpoint at a step boundary and exit 143 well inside the grace, so must its peer; the Job
replaces both (the disrupted pod uncounted, the peer within backoffLimitPerIndex), the new
pods resume from that checkpoint, and the run ends with the metrics and coordinator trace
of an uninterrupted run (fine-tuning the host's own pretraining on the host). Then the
evaluation Job writes its metrics, which must equal a host ``morec evaluate`` of the same
checkpoint, and the Ray head pod, whose lifetime is the pipeline's, exits 0 by itself.
While fine-tuning runs, the coordinator's and rank 0's metric endpoints named by the
PodMonitor answer on the pods' IPs.

The image build is cached (tests/tools/build_image.sh tags it with a content hash); a cold
build (debootstrap 1 min + wheelhouse and build 2 min) takes about 3 minutes here, the test
body about 5 minutes on the shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, skip_or_fail_in_ci
from tests.procs import TAG, end_job
from tests.test_checkpoint_resume import assert_same_tensors
from tests.test_k8s_manifests import kustomize_command

pytestmark = pytest.mark.slow
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--network-backend", "netavark"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
TINY = REPO / "tests" / "k8s" / "tiny"
UID = 1000


def sh(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


# ------------------------------------------------------------------ rendered manifests


def render(path: Path) -> list[dict[str, Any]]:
    command = kustomize_command()
    if command[0].endswith("/kustomize"):
        command = [*command, "build"]
    out = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ is a literal $,
    anything else is left as written."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


def field_ref(path: str, pod: Pod) -> str:
    if path == "status.podIP":
        return pod.ip
    if path == "metadata.name":
        return pod.name
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    assert match, f"fieldRef {path} is not one the test resolves"
    return (pod.labels if match.group(1) == "labels" else pod.annotations)[match.group(2)]


def resolve_env(container: dict[str, Any], pod: Pod, secrets_: dict[str, dict[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = field_ref(e["valueFrom"]["fieldRef"]["fieldPath"], pod)
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets_[ref["name"]][ref["key"]]
        else:
            raise AssertionError(f"env {e['name']}: a source the test does not resolve: {e}")
    return env


# --------------------------------------------------------------------------- the "cluster"


class Cluster:
    """A podman network standing in for the pod network, the volumes as host folders,
    Services as host names of the pods behind them."""

    def __init__(self, resources: list[dict[str, Any]], image: str, root: Path, tag: str):
        self.resources, self.image, self.root, self.tag = resources, image, root, tag
        self.network = f"morec-test-{tag}"
        self.subnet = f"10.{90 + int(tag[:2], 16) % 60}.{int(tag[2:4], 16)}"
        self.next_ip = 10
        self.ips: dict[str, str] = {}
        self.hosts: dict[str, str] = {}
        self.containers: list[str] = []
        self.secrets = {"morec-ray-auth": {"auth_token": secrets.token_hex(32)}}
        self.volumes = {"morec-data": root / "pv-data", "morec-runs": root / "pv-runs"}
        for path in self.volumes.values():
            path.mkdir(parents=True)
            os.chown(path, UID, UID)
        # --internal: no NAT and no default route in the pods, so they reach each other (and
        # the host on the gateway address, which scrapes them) but nothing outside. podman 4.3
        # drops the gateway of an internal network unless it is given: without it the host's
        # bridge has no address and could not reach the pods.
        sh(
            *PODMAN,
            "network",
            "create",
            "--internal",
            "--subnet",
            f"{self.subnet}.0/24",
            "--gateway",
            f"{self.subnet}.1",
            "--disable-dns",
            self.network,
        )

    def close(self) -> None:
        for name in self.containers:
            sh(*PODMAN, "rm", "-f", "-t", "0", name, check=False)
        sh(*PODMAN, "network", "rm", "-f", self.network, check=False)

    def ip(self, key: str) -> str:
        """One address per pod identity (Job, index): a replacement pod takes its
        predecessor's, as its stable DNS name would point to the new pod (podman's host
        entries are fixed when a container starts)."""
        if key not in self.ips:
            self.next_ip += 1
            self.ips[key] = f"{self.subnet}.{self.next_ip}"
        return self.ips[key]

    def configmap_dir(self, name: str, items: list[dict[str, str]] | None) -> Path:
        data = find(self.resources, "ConfigMap", name)["data"]
        folder = self.root / "configmaps" / name
        if not folder.exists():
            folder.mkdir(parents=True)
            for item in items or [{"key": k, "path": k} for k in data]:
                (folder / item["path"]).write_text(data[item["key"]])
        return folder


class Pod:
    """One pod of a Job (one attempt): its identity, then its containers run by podman."""

    def __init__(self, cluster: Cluster, job: dict[str, Any], index: int | None, attempt: int):
        self.cluster, self.job = cluster, job
        template = job["spec"]["template"]
        self.spec = template["spec"]
        job_name = job["metadata"]["name"]
        self.name = f"{job_name}-{index if index is not None else 0}-a{attempt}"
        self.hostname = f"{job_name}-{index}" if index is not None else self.name
        self.labels = {
            **template["metadata"].get("labels", {}),
            "batch.kubernetes.io/job-name": job_name,
            "job-name": job_name,
        }
        self.annotations = dict(template["metadata"].get("annotations", {}))
        if index is not None:
            self.annotations["batch.kubernetes.io/job-completion-index"] = str(index)
            self.labels["batch.kubernetes.io/job-completion-index"] = str(index)
        self.ip = cluster.ip(f"{job_name}/{index}")
        self.main = f"morec-{cluster.tag}-{self.name}"
        self.started = 0.0

    # DNS: the pod's own name under its subdomain, and the Services that select it
    def register(self) -> None:
        hosts = self.cluster.hosts
        if "subdomain" in self.spec:
            hosts[f"{self.hostname}.{self.spec['subdomain']}"] = self.ip
        for svc in (r for r in self.cluster.resources if r["kind"] == "Service"):
            selector = svc["spec"].get("selector", {})
            if (
                selector
                and all(self.labels.get(k) == v for k, v in selector.items())
                and svc["spec"].get("clusterIP") != "None"
            ):
                hosts[svc["metadata"]["name"]] = self.ip

    def podman_args(self, c: dict[str, Any], network: bool) -> list[str]:
        pod_sc, sc = self.spec.get("securityContext", {}), c.get("securityContext", {})
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        assert pod_sc.get("runAsNonRoot") and user not in (None, 0), f"{self.name}/{c['name']}: not a non-root pod"
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"  # podman's default profile
        args = [
            *PODMAN,
            "run",
            "-d",
            "--name",
            f"morec-{self.cluster.tag}-{self.name}-{c['name']}",
            *ULIMITS,
            "--user",
            f"{user}:{group}",
            "--group-add",
            str(pod_sc.get("fsGroup", group)),
        ]
        if sc.get("capabilities", {}).get("drop") == ["ALL"]:
            args += ["--cap-drop", "ALL"]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]  # writable: only the mounted volumes
        if network:
            args += ["--network", self.cluster.network, "--ip", self.ip, "--hostname", self.hostname]
            args += [f"--add-host={name}:{ip}" for name, ip in sorted(self.cluster.hosts.items())]
        else:
            args += ["--network", "none"]
        memory = c.get("resources", {}).get("limits", {}).get("memory")
        if memory:
            args += ["--memory", memory.replace("Gi", "g").replace("Mi", "m")]
        if "workingDir" in c:
            args += ["--workdir", c["workingDir"]]
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            ro = m.get("readOnly", False)
            if "configMap" in v:
                folder = self.cluster.configmap_dir(v["configMap"]["name"], v["configMap"].get("items"))
                args += ["-v", f"{folder}:{m['mountPath']}:ro"]
            elif "persistentVolumeClaim" in v:
                ro = ro or v["persistentVolumeClaim"].get("readOnly", False)
                volume = self.cluster.volumes[v["persistentVolumeClaim"]["claimName"]]
                args += ["-v", f"{volume}:{m['mountPath']}:{'ro' if ro else 'rw'}"]
            elif "emptyDir" in v:
                size = v["emptyDir"].get("sizeLimit", "1Gi").replace("Gi", "g").replace("Mi", "m")
                if m["mountPath"] == "/dev/shm":
                    args += ["--shm-size", size]
                else:
                    args += ["--tmpfs", f"{m['mountPath']}:rw,exec,nosuid,nodev,size={size},mode=1777"]
            else:
                raise AssertionError(f"volume {v} is not one the test provides")
        env = resolve_env(c, self, self.cluster.secrets)
        for k, value in env.items():
            args += ["-e", f"{k}={value}"]
        command = [expand(x, env) for x in c.get("command", [])]
        rest = [expand(x, env) for x in c.get("args", [])]
        assert command, (
            f"{c['name']}: the manifests name the command explicitly (the image's ENTRYPOINT is not relied on)"
        )
        return [*args, "--entrypoint", json.dumps(command[:1]), self.cluster.image, *command[1:], *rest]

    def start(self) -> None:
        """The kubelet: init containers in order, each to completion; then the main one."""
        self.register()
        for c in self.spec.get("initContainers", []):
            name = f"morec-{self.cluster.tag}-{self.name}-{c['name']}"
            self.cluster.containers.append(name)
            sh(*self.podman_args(c, network=False))
            code = int(sh(*PODMAN, "wait", name, timeout=600).stdout.strip())
            assert code == 0, f"init container {name} exited {code}:\n{logs(name)}"
        (c,) = self.spec["containers"]
        self.main = f"morec-{self.cluster.tag}-{self.name}-{c['name']}"
        self.cluster.containers.append(self.main)
        sh(*self.podman_args(c, network=True))
        self.started = time.monotonic()

    def exit_code(self) -> int | None:
        out = sh(*PODMAN, "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.main).stdout.split()
        return int(out[1]) if out[0] in ("exited", "stopped") else None

    def stop_as_the_kubelet(self) -> tuple[int | None, float]:
        """SIGTERM, terminationGracePeriodSeconds, then SIGKILL: the exit code and how long it took."""
        grace = int(self.spec.get("terminationGracePeriodSeconds", 30))
        start = time.monotonic()
        sh(*PODMAN, "stop", "-t", str(grace), self.main, timeout=grace + 60)
        return self.exit_code(), time.monotonic() - start


def logs(name: str) -> str:
    out = sh(*PODMAN, "logs", name, check=False)
    return (out.stdout + out.stderr)[-6000:]


class JobController:
    """Replaces failed pods by the Job's rendered failure policy: podFailurePolicy rules in
    order (FailJob / Ignore / Count), then backoffLimitPerIndex (Indexed) or backoffLimit."""

    def __init__(self, cluster: Cluster, job: dict[str, Any]):
        self.cluster, self.job = cluster, job
        spec = job["spec"]
        self.indexed = spec.get("completionMode") == "Indexed"
        self.count = spec.get("completions", 1)
        self.attempts = [0] * self.count
        self.failures = [0] * self.count
        self.pods: list[Pod] = [self.new_pod(i) for i in range(self.count)]
        self.done = [False] * self.count
        self.disrupted: set[str] = set()
        self.history: list[tuple[int, int, str]] = []  # (index, exit code, action)

    def new_pod(self, i: int) -> Pod:
        self.attempts[i] += 1
        return Pod(self.cluster, self.job, i if self.indexed else None, self.attempts[i])

    def start(self) -> None:
        for pod in self.pods:
            pod.register()  # every pod's name resolves before any starts (publishNotReadyAddresses)
        for pod in self.pods:
            pod.start()

    def action(self, pod: Pod, code: int) -> str:
        for rule in self.job["spec"].get("podFailurePolicy", {}).get("rules", []):
            if "onExitCodes" in rule:
                on = rule["onExitCodes"]
                hit = code in on["values"] if on["operator"] == "In" else code not in on["values"]
                if (
                    hit
                    and on.get("containerName", pod.spec["containers"][0]["name"]) == pod.spec["containers"][0]["name"]
                ):
                    return rule["action"]
            for cond in rule.get("onPodConditions", []):
                if cond["type"] == "DisruptionTarget" and pod.main in self.disrupted:
                    return rule["action"]
        return "Count"

    def step(self) -> bool:
        """Look at every pod once; True when the Job completed."""
        for i, pod in enumerate(self.pods):
            if self.done[i]:
                continue
            code = pod.exit_code()
            if code is None:
                continue
            if code == 0:
                self.done[i] = True
                continue
            action = self.action(pod, code)
            self.history.append((i, code, action))
            if action == "FailJob":
                raise AssertionError(
                    f"{self.job['metadata']['name']}: pod {pod.name} exited {code}: FailJob\n{logs(pod.main)}"
                )
            if action == "Count":
                self.failures[i] += 1
                limit = self.job["spec"].get("backoffLimitPerIndex", self.job["spec"].get("backoffLimit", 6))
                if self.failures[i] > limit:
                    raise AssertionError(
                        f"{self.job['metadata']['name']}: index {i} failed {self.failures[i]} times\n{logs(pod.main)}"
                    )
            # podReplacementPolicy Failed: the old pod has terminated; its replacement starts now
            self.pods[i] = self.new_pod(i)
            self.pods[i].start()
        return all(self.done)

    def wait(self, timeout: float, every: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.step():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.job['metadata']['name']} did not complete in {timeout} s:\n"
                    + "\n".join(logs(p.main) for p in self.pods)
                )
            time.sleep(every)


# --------------------------------------------------------------------------------- test


@pytest.fixture(scope="module")
def image() -> str:
    if os.geteuid() != 0:
        skip_or_fail_in_ci("podman with networks needs root here")
    if shutil.which("podman") is None or shutil.which("debootstrap") is None:
        pytest.fail("podman/debootstrap missing: run tests/tools/install_containers.sh (make test does)")
    start = time.monotonic()
    out = subprocess.run(
        ["bash", str(REPO / "tests" / "tools" / "build_image.sh")],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    print(f"image {out.stdout.strip()} ready in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return out.stdout.strip().splitlines()[-1]


def tiny_dataset(folder: Path) -> Path:
    from morec_dist.data.prepare.synthetic import generate

    return generate(folder, users=400, items=300, rows=40_000, seed=11)


def first_step_checkpoint(folder: Path, timeout: float, pods: list[Pod]) -> int:
    """The first complete step checkpoint's step, as soon as it exists: the folder is read
    every 20 ms, the pods (a podman inspect each, slow on a loaded machine) every 5 s, so the
    stop that follows lands right after it, far from the end of the training."""
    deadline = time.monotonic() + timeout
    next_look = 0.0
    while time.monotonic() < deadline:
        steps = sorted(
            int(p.name.split("-")[1])
            for p in folder.glob("step-*")
            if p.is_dir() and re.fullmatch(r"step-\d+", p.name) and (p / "meta.json").exists()
        )
        if steps:
            return steps[0]
        if time.monotonic() > next_look:
            for pod in pods:
                assert pod.exit_code() is None, f"{pod.name} exited before the first checkpoint:\n{logs(pod.main)}"
            next_look = time.monotonic() + 5
        time.sleep(0.02)
    raise AssertionError("no step checkpoint appeared:\n" + "\n".join(logs(p.main) for p in pods))


def answer(url: str, timeout: float, pods: list[Pod]) -> str:
    """The endpoint's page once it answers (it opens when the job starts, not with the pod)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(url)
        except OSError:
            if time.monotonic() > deadline:
                pages = "\n".join(logs(p.main) for p in pods)
                raise AssertionError(f"{url} did not answer in {timeout} s:\n{pages}") from None
            time.sleep(0.2)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


class HostJob:
    """A ``morec`` job on the host, in the background: the same config, world size and
    threads per rank (the cpu overlay's OMP_NUM_THREADS) as the pods. Tagged as
    tests/procs.py tags a job, so ``close`` ends it with its torchrun ranks."""

    def __init__(self, name: str, args: list[str], folder: Path):
        self.name, self.log, self.tag = name, folder / f"{name}.log", uuid.uuid4().hex
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "4", TAG: self.tag}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "morec_dist.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),
            env=env,
            cwd=REPO,
            start_new_session=True,
        )

    def finish(self, timeout: float = 600) -> str:
        """Waits for the job; its stderr. A failed job fails the test."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.close()
        assert code == 0, f"host {self.name} exited {code}:\n{self.log.read_text()[-4000:]}"
        return self.log.read_text()

    def close(self) -> None:
        end_job(self.proc, self.tag)


def host_job_args(command: str, data: Path, out: Path, *extra: str) -> list[str]:
    # no exporters on the host (the tiny config's listen on 0.0.0.0 for the pods)
    return [
        command,
        *extra,
        "--config",
        str(TINY / "job.toml"),
        f'data.path="{data}"',
        f'run.out_dir="{out}"',
        "metrics.enabled=false",
    ]


RANKING = ("hit@10", "ndcg@10", "r_hit@10", "r_ndcg@10", "min_hit@10", "min_ndcg@10", "pop_kl@10")


def test_pipeline_survives_a_pod_stop_in_restricted_containers(image, tmp_path):
    tag = uuid.uuid4().hex[:8]
    resources = render(TINY)
    cpu = render(REPO / "k8s" / "overlays" / "cpu")
    jobs = {j["metadata"]["name"]: j for j in resources if j["kind"] == "Job"}
    assert set(jobs) == {"morec-pretrain", "morec-finetune", "morec-evaluate", "morec-export", "morec-ray-head"}
    for name, job in jobs.items():  # the tiny overlay changes the config only
        assert json.dumps(job, sort_keys=True).replace(
            find(
                resources,
                "ConfigMap",
                next(r["metadata"]["name"] for r in resources if r["metadata"]["name"].startswith("morec-job-config")),
            )["metadata"]["name"],
            "CM",
        ) == json.dumps(find(cpu, "Job", name), sort_keys=True).replace(
            next(r["metadata"]["name"] for r in cpu if r["metadata"]["name"].startswith("morec-job-config")), "CM"
        ), name
    run_name = find(resources, "ConfigMap", "morec-run")["metadata"]["name"]

    root = tmp_path / "cluster"
    cluster = Cluster(resources, image, root, tag)
    timings: dict[str, float] = {}
    host_jobs: list[HostJob] = []
    max_steps = tomllib.loads((TINY / "job.toml").read_text())["train"]["max_steps"]
    try:
        data = tiny_dataset(cluster.volumes["morec-data"] / "tiny")
        # fsGroup: the kubelet gives the pod's group ownership of the volume (chgrp -R, g+rwX, setgid dirs)
        fs_group = str(jobs["morec-finetune"]["spec"]["template"]["spec"]["securityContext"]["fsGroup"])
        subprocess.run(["chgrp", "-R", fs_group, str(cluster.volumes["morec-data"])], check=True)
        subprocess.run(["chmod", "-R", "g+rwX,a+rX", str(cluster.volumes["morec-data"])], check=True)
        runs = cluster.volumes["morec-runs"] / run_name
        host = tmp_path / "host"
        host.mkdir()

        # ---- stage 1: pretraining; the host pretrains the same way meanwhile (its reference)
        t0 = time.monotonic()
        pretrain = JobController(cluster, jobs["morec-pretrain"])
        pretrain.start()
        host_pretrain = HostJob("pretrain", host_job_args("train", data, host / "pretrain"), host)
        host_jobs.append(host_pretrain)
        pretrain.wait(timeout=400)
        timings["pretrain"] = time.monotonic() - t0

        # ---- stage 2: the Ray head, then MoRec fine-tuning (its init containers pass now)
        t0 = time.monotonic()
        head = JobController(cluster, jobs["morec-ray-head"])
        head.start()
        finetune = JobController(cluster, jobs["morec-finetune"])
        finetune.start()
        checkpoints = runs / "morec" / "checkpoints"

        # PodMonitor endpoints: the coordinator on the head, rank 0 of a trainer pod. Each
        # answers from the job's start (before the first step); asked until then.
        monitor = find(resources, "PodMonitor", "morec")
        endpoints = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
        head_ports = {p["name"]: p["containerPort"] for p in head.pods[0].spec["containers"][0]["ports"]}
        trainer_ports = {p["name"]: p["containerPort"] for p in finetune.pods[0].spec["containers"][0]["ports"]}
        assert "coordinator" not in trainer_ports and {"coordinator", "rank0"} <= endpoints
        rank0 = answer(f"http://{finetune.pods[0].ip}:{trainer_ports['rank0']}/metrics", 300, finetune.pods)
        assert "morec_" in rank0, rank0[:2000]
        # the actor is pinned to the head node: its metrics are served there, nowhere else
        serving = {}
        for pod in [*head.pods, *finetune.pods]:
            try:
                serving[pod.name] = scrape(f"http://{pod.ip}:{head_ports['coordinator']}/metrics")
            except OSError:
                pass
        assert list(serving) == [head.pods[0].name] and "morec_coordinator_" in serving[head.pods[0].name], serving

        # the host pretraining equals the pods' (the reference below starts from the host's own)
        host_pretrain.finish()
        want_pretrain = json.loads((host / "pretrain" / "metrics.json").read_text())
        got_pretrain = json.loads((runs / "pretrain" / "metrics.json").read_text())
        assert got_pretrain["world_size"] == want_pretrain["world_size"] == 2
        for key in ("train_loss", "best_epoch", "valid", *RANKING):
            assert got_pretrain[key] == want_pretrain[key], key
        assert_same_tensors(
            runs / "pretrain" / "checkpoints" / "best", host / "pretrain" / "checkpoints" / "best", tmp_path
        )

        # ---- the kubelet stops pod 1 (eviction) at its first step checkpoint, mid-training:
        # SIGTERM -> checkpoint -> 143 inside the grace
        first = first_step_checkpoint(checkpoints, 300, [*finetune.pods, *head.pods])
        victim = finetune.pods[1]
        finetune.disrupted.add(victim.main)
        code, took = victim.stop_as_the_kubelet()
        grace = int(victim.spec["terminationGracePeriodSeconds"])
        victim_log = logs(victim.main)
        assert code == 143, f"exit {code} after {took:.0f} s (137 = SIGKILL after the grace):\n{victim_log}"
        assert took < grace / 2, f"took {took:.0f} s of the {grace} s grace"
        peer = finetune.pods[0]
        deadline = time.monotonic() + 120
        while peer.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert peer.exit_code() == 143, logs(peer.main)
        stopped = max(
            int(p.name.split("-")[1])
            for p in checkpoints.glob("step-*")
            if re.fullmatch(r"step-\d+", p.name) and (p / "meta.json").exists()
        )
        both = logs(peer.main) + victim_log
        assert first <= stopped <= max_steps, both  # a stop at the last step saves it too
        assert f"preempted: checkpoint at step {stopped} written; exiting 143" in both, both

        # ---- the Job replaces both; they resume and finish
        finetune.wait(timeout=400)
        assert sorted(finetune.history) == [(0, 143, "Count"), (1, 143, "Ignore")], finetune.history
        resumed = "".join(logs(p.main) for p in finetune.pods)
        assert (
            f"resuming from /runs/{run_name}/morec/checkpoints/step-{stopped} at step {stopped}" in resumed
            and "(exact)" in resumed
        ), resumed
        timings["finetune"] = time.monotonic() - t0
        assert head.pods[0].exit_code() is None, "the Ray head ended before the pipeline"

        # the uninterrupted reference runs on the host meanwhile, from the host's own pretraining
        reference = HostJob(
            "finetune",
            host_job_args(
                "finetune",
                data,
                host / "morec",
                "--method",
                "morec",
                "--from",
                str(host / "pretrain" / "checkpoints" / "best"),
            ),
            host,
        )
        host_jobs.append(reference)

        # ---- stage 3: evaluation; then the head ends by itself
        t0 = time.monotonic()
        evaluate = JobController(cluster, jobs["morec-evaluate"])
        evaluate.start()
        evaluate.wait(timeout=300)
        head.wait(timeout=60)
        timings["evaluate+head"] = time.monotonic() - t0
        assert head.history == [], head.history

        # ---- stage 4: the serving artefacts of the evaluated model (`morec export --index`)
        t0 = time.monotonic()
        export = JobController(cluster, jobs["morec-export"])
        export.start()
        export.wait(timeout=300)
        timings["export"] = time.monotonic() - t0
        assert export.history == [], export.history
        exported = json.loads((runs / "export" / "manifest.json").read_text())
        assert exported["checkpoint"]["path"] == f"/runs/{run_name}/morec/checkpoints/final"
        assert exported["export"]["world_size"] == 2 and exported["index"]["kind"] == "flat"
        assert {"index.faiss", "items/part-00000.parquet", "users/part-00000.parquet"} <= set(exported["files"])
        assert not list(runs.glob("export.tmp-*"))

        # ---- the interrupted run equals an uninterrupted one
        t0 = time.monotonic()
        got = json.loads((runs / "morec" / "metrics.json").read_text())
        reference.finish()
        want = json.loads((host / "morec" / "metrics.json").read_text())
        timings["reference (after evaluate)"] = time.monotonic() - t0
        assert got["world_size"] == want["world_size"] == 2
        assert got["coordinator"]["trace"]["beta"] == want["coordinator"]["trace"]["beta"]
        for key in RANKING:
            assert got[key] == want[key], key

        # ---- the evaluation Job equals a host `morec evaluate` of the same checkpoint (and the
        # fine-tuning's own test metrics of that model)
        t0 = time.monotonic()
        host_eval = HostJob(
            "evaluate",
            host_job_args(
                "evaluate",
                data,
                host / "evaluate",
                "--checkpoint",
                str(runs / "morec" / "checkpoints" / "final"),
                "--split",
                "test",
                "--out",
                str(host / "metrics-test.json"),
            ),
            host,
        )
        host_jobs.append(host_eval)
        host_eval.finish()
        timings["host evaluate"] = time.monotonic() - t0
        pod_eval = json.loads((runs / "morec" / "metrics-test.json").read_text())
        want_eval = json.loads((host / "metrics-test.json").read_text())
        assert pod_eval["split"] == want_eval["split"] == "test" and pod_eval["world_size"] == 2
        for key in RANKING:
            assert pod_eval[key] == want_eval[key] == got[key], key
        assert pod_eval["baselines"] == want_eval["baselines"]
        print(
            f"timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}; "
            f"stopped at step {stopped} (first checkpoint {first}); the stop took {took:.1f} s",
            file=sys.stderr,
        )
    finally:
        for job in host_jobs:
            job.close()
        cluster.close()
