"""The object-store pipeline on this machine, as its Kubernetes manifests give it.

k8s/overlays/object-store is rendered by kustomize, and each pod's commands, arguments and
variables (``$(VAR)`` resolved as the kubelet does) are run here against an S3-compatible
server on loopback (tests/s3_loopback.py): nothing is on a shared volume, every path the
stages name is an s3:// URI, and the endpoint and the credentials reach them only as the
pods' variables (AWS_ENDPOINT_URL from the optional ConfigMap, AWS_* keys from the Secret).
The dataset is prepared to the store; pretraining writes its run directory there; the init
containers of fine-tuning and of the Ray head block on pretraining's metrics.json there
and pass once it is written; MoRec fine-tuning starts from the best checkpoint on the
store (``--from s3://...``) with the run's Ray head; evaluation's init container waits for
fine-tuning's metrics.json, it evaluates the final checkpoint on the store and writes
metrics-test.json there, upon which the Ray head ends by itself (``--until`` a URI) and the
export's init container passes; the export writes the final checkpoint's serving artefacts
and its index to the store, manifest.json last.

What the host changes, each because a machine is not a cluster: each training stage is
its pod 0 alone (NNODES=1, the manifest's one rank per pod; two ranks writing shards to
s3:// are tests/test_s3_training.py's), loopback and free ports for the rendezvous and the
Ray head, RAY_JOIN=auto (the head is on this machine), the job config of tests/k8s/tiny
(the container test's tiny schedule, here 20 steps a stage, evaluation on one rank) with
the exporters off (their fixed ports are shared by every test here), and the
ConfigMap / Secret values
(the loopback store, moto's fake keys). ``tini -s --`` (PID 1 of the image) is left out.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from morec_dist.data import storage
from morec_dist.train.checkpoint import META
from tests.conftest import REPO, free_tcp_port
from tests.procs import TAG, end_job, run_job
from tests.s3_loopback import FAKE_AWS, moto_s3
from tests.test_k8s_manifests import render, resolved_argv, resolved_env, stage

pytestmark = pytest.mark.slow

TINY_CONFIG = REPO / "tests" / "k8s" / "tiny" / "job.toml"
CONFIG_MOUNT = "/etc/morec/job.toml"


class Host:
    """The values the kubelet would give the pods of one run, for this machine."""

    def __init__(self, tmp: Path, s3: Any, resources: list[dict[str, Any]]):
        self.resources = resources
        self.tmp = tmp
        self.config = tmp / "job.toml"
        tiny = TINY_CONFIG.read_text()
        changes = {
            "[metrics]\nenabled = true": "[metrics]\nenabled = false",
            "max_steps = 40": "max_steps = 20",
            "nproc = 2": "nproc = 1",  # evaluation's ranks (`morec evaluate` takes run.nproc), as a pod's
        }
        for old, new in changes.items():
            assert tiny.count(old) == 1, old
            tiny = tiny.replace(old, new)
        self.config.write_text(tiny)
        (tmp / "home").mkdir()
        self.store = f"s3://{s3.bucket}/morec"  # no query: the endpoint comes from AWS_ENDPOINT_URL
        self.data = f"{self.store}/data/tiny"
        self.ray_port = free_tcp_port()
        self.token = secrets.token_hex(16)
        self.values = {  # <placeholder> of test_k8s_manifests.resolved_env -> value
            "<status.podIP>": "127.0.0.1",
            "<secret:morec-ray-auth/auth_token>": self.token,
            "<secret:morec-object-store/AWS_ACCESS_KEY_ID>": FAKE_AWS["AWS_ACCESS_KEY_ID"],
            "<secret:morec-object-store/AWS_SECRET_ACCESS_KEY>": FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
            "<configmap:morec-object-store/AWS_ENDPOINT_URL>": f"http://{s3.host}:{s3.port}",
            "<configmap:morec-object-store/AWS_REGION>": "us-east-1",
        }
        (locations,) = [c for c in resources if c["kind"] == "ConfigMap" and "store-locations" in c["metadata"]["name"]]
        self.values[f"<configmap:{locations['metadata']['name']}/store>"] = self.store
        self.values[f"<configmap:{locations['metadata']['name']}/data>"] = self.data

    def command(self, job_name: str, name: str, init: bool = False) -> tuple[list[str], dict[str, str]]:
        """A container's argv and environment as the pod would have them, then the host's changes."""
        job = stage(self.resources, job_name)
        spec = job["spec"]["template"]["spec"]
        (c,) = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
        fields = {
            "metadata.labels['batch.kubernetes.io/job-name']": job["metadata"]["name"],
            "metadata.annotations['batch.kubernetes.io/job-completion-index']": "0",
        }
        variables = {k: self.values.get(v, v) for k, v in resolved_env(c, fields).items()}
        variables.update(self.host_changes(variables))
        argv = [self.expand(a, variables) for a in resolved_argv({**c, "env": []})]
        for text in [*argv, *variables.values()]:
            assert "<" not in text and "$(" not in text, f"{job_name}/{name}: unresolved {text!r}"
        if argv[:3] == ["tini", "-s", "--"]:
            argv = argv[3:]
        argv = [self.config.as_posix() if a == CONFIG_MOUNT else a for a in argv]
        assert c["workingDir"] == "/opt/morec"  # the repository root in the image: REPO here
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},  # the pod's, not moto's
            **variables,
            "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}",  # the image's PATH
            "BIND_ADDR": "127.0.0.1",  # nothing of the job listens beyond loopback here
            "TMPDIR": str(self.tmp),
            "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        return argv, env

    def expand(self, text: str, variables: dict[str, str]) -> str:
        for key, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(f"$({key})", value)
        return self.values.get(text, text)

    def host_changes(self, variables: dict[str, str]) -> dict[str, str]:
        out = {"HOME": str(self.tmp / "home")}
        if "NNODES" in variables:  # the manifest's pod 0 alone: its NPROC_PER_NODE ranks, a loopback rendezvous
            out |= {"NNODES": "1", "RDZV_ENDPOINT": f"127.0.0.1:{free_tcp_port()}"}
        if variables.get("RAY_JOIN") == "yes":
            out |= {"RAY_JOIN": "auto", "MOREC_RAY_ADDRESS": f"127.0.0.1:{self.ray_port}"}
        return out


def start(argv: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """A process of the run in the background, tagged so that tests/procs.end_job ends all of it."""
    tag = uuid.uuid4().hex
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        env={**env, TAG: tag},
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        start_new_session=True,
    )
    return process, tag


def run(argv: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    t = time.monotonic()
    proc = run_job(argv, timeout, env=env, cwd=REPO)
    print(f"{' '.join(argv[:3])}: {time.monotonic() - t:.1f} s", file=sys.stderr)  # shown with -s or on failure
    assert proc.returncode == 0, f"{' '.join(argv[:4])} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


class Watch:
    """A waiting init container: records whether its marker existed when it exited."""

    def __init__(self, process: subprocess.Popen, marker: str):
        self.process = process
        self.marker_seen: bool | None = None
        self.marker = storage.location(marker)
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        self.process.wait()
        self.marker_seen = storage.exists(self.marker)

    def passed(self, timeout: float = 60) -> bool:
        self.thread.join(timeout)
        return self.process.returncode == 0 and bool(self.marker_seen)


def wait_port(port: int, timeout: float, head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, f"the Ray head exited {head.returncode}:\n{log.read_text()[-3000:]}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the Ray head did not listen on {port} within {timeout} s:\n{log.read_text()[-3000:]}")


def test_object_store_pipeline_runs_as_the_manifests_give_it(tmp_path, monkeypatch):
    resources = render("object-store")
    started: list[tuple[subprocess.Popen, str]] = []
    with moto_s3() as s3:
        host = Host(tmp_path, s3, resources)
        # the AWS_* variables of the pods (endpoint included) for this process's own reads too
        # (monkeypatch: restored after the test, whatever the variable was before)
        monkeypatch.setenv("AWS_ENDPOINT_URL", host.values["<configmap:morec-object-store/AWS_ENDPOINT_URL>"])
        try:
            pretrain_argv, pretrain_env = host.command("morec-pretrain", "trainer")
            run(
                [sys.executable, "-m", "morec_dist.cli", "prepare", "synthetic", "--users", "200", "--items", "150"]
                + ["--rows", "8000", "--seed", "11", "--out", host.data],
                pretrain_env,
            )
            run_dir = f"{host.store}/runs/{host.command('morec-pretrain', 'trainer')[1]['MOREC_RUN']}"
            assert storage.exists(storage.location(f"{host.data}/manifest.json"))

            # the init containers of stage 2 and of the head start with the run: they must block
            waits = {}
            for job_name, init in (("morec-finetune", "wait-for-pretrain"), ("morec-ray-head", "wait-for-pretrain")):
                argv, env = host.command(job_name, init, init=True)
                assert argv == ["launch/wait_for.sh", f"{run_dir}/pretrain/metrics.json"]
                started.append(start(argv, env, tmp_path / f"{job_name}-{init}.log"))
                waits[job_name] = Watch(started[-1][0], argv[1])
            assert pretrain_argv[:2] == ["launch/multinode.sh", "--"]
            assert f"run.out_dir={run_dir}/pretrain" in pretrain_argv and f"data.path={host.data}" in pretrain_argv
            # (each Watch also records that the marker existed when its wait ended)
            assert all(w.process.poll() is None for w in waits.values()), "an init container passed before pretraining"
            run(pretrain_argv, pretrain_env)
            assert storage.exists(storage.location(f"{run_dir}/pretrain/checkpoints/best/{META}"))
            for job_name, watch in waits.items():
                assert watch.passed(), f"{job_name}'s init container: exit {watch.process.returncode}"

            head_argv, head_env = host.command("morec-ray-head", "ray-head")
            head_argv[head_argv.index("--port") + 1] = str(host.ray_port)
            assert head_argv[:2] == ["launch/ray_head.sh", "--foreground"]
            assert head_argv[head_argv.index("--until") + 1] == f"{run_dir}/morec/metrics-test.json"
            head_log = tmp_path / "ray-head.log"
            started.append(start(head_argv, head_env, head_log))
            head = started[-1][0]
            wait_port(host.ray_port, 120, head, head_log)

            argv, env = host.command("morec-evaluate", "wait-for-finetune", init=True)
            assert argv == ["launch/wait_for.sh", f"{run_dir}/morec/metrics.json"]
            started.append(start(argv, env, tmp_path / "evaluate-wait.log"))
            evaluate_wait = Watch(started[-1][0], argv[1])

            finetune_argv, finetune_env = host.command("morec-finetune", "trainer")
            assert finetune_argv[finetune_argv.index("--from") + 1] == f"{run_dir}/pretrain/checkpoints/best"
            assert finetune_env["MOREC_RAY_ADDRESS"] == f"127.0.0.1:{host.ray_port}"
            assert evaluate_wait.process.poll() is None, "evaluation's init container passed before fine-tuning"
            run(finetune_argv, finetune_env)
            assert evaluate_wait.passed(), f"evaluation's init container: exit {evaluate_wait.process.returncode}"
            assert head.poll() is None  # the head lives until the last stage's output

            argv, env = host.command("morec-export", "wait-for-evaluate", init=True)
            assert argv == ["launch/wait_for.sh", f"{run_dir}/morec/metrics-test.json"]
            started.append(start(argv, env, tmp_path / "export-wait.log"))
            export_wait = Watch(started[-1][0], argv[1])

            evaluate_argv, evaluate_env = host.command("morec-evaluate", "evaluate")
            assert evaluate_argv[:2] == ["morec", "evaluate"]
            assert export_wait.process.poll() is None, "the export's init container passed before the evaluation"
            run(evaluate_argv, evaluate_env)
            head.wait(timeout=60)  # ends by itself once metrics-test.json is on the store
            assert head.returncode == 0, head_log.read_text()[-3000:]
            assert "metrics-test.json exists: the job is done" in head_log.read_text()
            assert export_wait.passed(), f"the export's init container: exit {export_wait.process.returncode}"

            export_argv, export_env = host.command("morec-export", "export")
            assert export_argv[:2] == ["morec", "export"] and export_argv[export_argv.index("--out") + 1] == (
                f"{run_dir}/export"
            )
            run(export_argv, export_env)
            exported = storage.location(f"{run_dir}/export")
            manifest = json.loads(storage.read_text(exported / "manifest.json"))
            assert manifest["checkpoint"]["path"] == f"{run_dir}/morec/checkpoints/final"
            assert manifest["index"]["faiss_class"] == "IndexFlatIP" and manifest["dataset"]["path"] == host.data
            for rel, info in manifest["files"].items():  # every file the manifest lists is on the store, checked
                assert storage.sha256(exported / rel) == info["sha256"], rel
            assert not list(host.tmp.glob("morec-export-*"))  # the staging directory (TMPDIR) is gone

            def read(rel: str) -> dict[str, Any]:
                return json.loads(storage.read_text(storage.location(f"{run_dir}/{rel}")))

            pretrained, tuned, tested = (
                read("pretrain/metrics.json"),
                read("morec/metrics.json"),
                read("morec/metrics-test.json"),
            )
            assert pretrained["config"]["data"]["path"] == host.data
            assert pretrained["config"]["run"]["out_dir"] == f"{run_dir}/pretrain"
            assert (
                tuned["job"] == "finetune:morec" and tuned["from_checkpoint"] == f"{run_dir}/pretrain/checkpoints/best"
            )
            assert tuned["coordinator"]["trace"]["beta"]  # MoRec ran with the run's head
            assert storage.exists(storage.location(f"{run_dir}/morec/checkpoints/final/{META}"))
            assert tested["checkpoint"] == f"{run_dir}/morec/checkpoints/final" and tested["split"] == "test"
            for key in ("hit@10", "ndcg@10", "r_hit@10", "min_hit@10", "pop_kl@10"):
                assert tested[key] == tuned[key], key  # the final checkpoint on the store is the model tested
            # nothing went to a local run directory: everything is on the store
            assert not list(REPO.glob("s3:*")) and not (tmp_path / "runs").exists()
        finally:
            for process, tag in started:
                end_job(process, tag)
            shutil.rmtree(tmp_path / "home", ignore_errors=True)
