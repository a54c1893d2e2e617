"""The launch scripts: the torchrun command they build, their input errors, and real runs.

Real runs: ``launch/train.sh`` starting two standalone ranks, two "nodes" on this machine
meeting through a c10d rendezvous on loopback (node 0 hosts the store), and
``launch/ray_head.sh`` starting a head a driver can use and stopping exactly that head.
The multi-host run across network namespaces is tests/ of the trainer (it needs the trainer).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.sh"
MULTINODE = REPO / "launch" / "multinode.sh"
RAY_HEAD = REPO / "launch" / "ray_head.sh"
CONFIG = "configs/ml1m_mf_pretrain.toml"


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "NNODES", "RDZV_ENDPOINT", "NPROC_PER_NODE")
    }
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)


def dry_run(*args: str, env: dict[str, str] | None = None) -> list[str]:
    result = run([str(TRAIN), "--dry-run", *args], env)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------ commands


def test_one_machine_is_standalone_and_runs_the_morec_module():
    cmd = dry_run("--nproc", "2", "--", "train", "--config", "configs/ml1m_mf_pretrain.toml")
    assert cmd[0] == str(REPO / ".venv" / "bin" / "python")
    # torchrun through morec_dist.train.bind: its stores listen on loopback, the ranks dial it there
    assert cmd[1:5] == ["-m", "morec_dist.train.bind", "--bind", "127.0.0.1"]
    assert {"--standalone", "--local-addr=127.0.0.1", "--nproc_per_node=2"} <= set(cmd)
    i = cmd.index("-m", 3)
    assert cmd[i:] == ["-m", "morec_dist.cli", "train", "--config", "configs/ml1m_mf_pretrain.toml"]
    assert not any(a.startswith("--rdzv") for a in cmd)


def test_many_machines_use_c10d_and_node_zero_hosts_the_store():
    node0 = dry_run("--nnodes", "2", "--node-rank", "0", "--rdzv", "10.0.0.1:29400", "train")
    node1 = dry_run("--nnodes", "2", "--rdzv", "10.0.0.1:29400", "train", env={"NODE_RANK": "1"})
    for cmd in (node0, node1):
        assert "--standalone" not in cmd
        assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_id=morec"} <= set(cmd)
    assert "--rdzv_conf=is_host=1" in node0 and "--rdzv_conf=is_host=0" in node1
    # every interface unless the user names one (the pods' NetworkPolicy covers it on Kubernetes)
    assert node0[1:3] == ["-m", "torch.distributed.run"]


def test_many_machines_bind_the_address_the_user_names():
    by_flag = dry_run("--nnodes", "2", "--rdzv", "10.0.0.1:29400", "--bind", "10.0.0.1", "train")
    by_env = dry_run("--nnodes", "2", "--rdzv", "10.0.0.1:29400", "train", env={"BIND_ADDR": "10.0.0.1"})
    for cmd in (by_flag, by_env):
        assert cmd[1:5] == ["-m", "morec_dist.train.bind", "--bind", "10.0.0.1"] and "--standalone" not in cmd


def test_multinode_passes_the_ray_address_and_joins_ray_unless_the_head_is_here():
    env = {
        "NODE_RANK": "1",
        "NNODES": "2",
        "RDZV_ENDPOINT": "10.0.0.1:29400",
        "MOREC_RAY_ADDRESS": "10.9.9.9:6379",
        "RAY_AUTH_TOKEN": "test-only-not-a-secret",
    }
    result = run([str(MULTINODE), "--dry-run", "--", "train", "--config", CONFIG], env)
    assert result.returncode == 0, result.stderr
    join, torchrun = result.stdout.strip().splitlines()
    assert "ray start --address=10.9.9.9:6379 --num-cpus=0" in join
    cmd = shlex.split(torchrun)
    assert cmd[-4:] == ["train", "--config", CONFIG, "coordinator.ray_address=10.9.9.9:6379"]
    assert "--rdzv_conf=is_host=0" in cmd
    local = run(
        [str(MULTINODE), "--dry-run", "train"], {**env, "MOREC_RAY_ADDRESS": "127.0.0.1:6379", "NODE_RANK": "0"}
    )
    assert local.returncode == 0, local.stderr
    assert "ray start" not in local.stdout  # the head's raylet serves this node's drivers


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--nnodes", "2", "train"], {}, "--nnodes 2 needs --rdzv"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv", "h:1", "train"], {}, "--node-rank 2: expected < --nnodes 2"),
        (["--nproc", "0", "train"], {}, "--nproc: expected a positive integer"),
        (["--rdzv", "nohostport", "train"], {}, "--rdzv: expected HOST:PORT"),
        (["--nproc", "2"], {}, "no morec arguments"),
        (["--bind", "myhost", "train"], {}, "--bind (or BIND_ADDR): expected an IP address, got 'myhost'"),
    ],
)
def test_train_sh_refuses_bad_input_with_a_clear_message(args, env, message):
    result = run([str(TRAIN), *args], env)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_max_restarts_come_from_the_config_unless_given():
    """Under torchrun there is no morec parent: train.sh reads run.max_restarts itself."""
    assert "--max_restarts=0" in dry_run("--", "train", "--config", CONFIG)
    assert "--max_restarts=3" in dry_run("--", "train", "--config", CONFIG, "run.max_restarts=3")
    assert "--max_restarts=1" in dry_run("--", "finetune", "--from", "x", "--config", CONFIG, "--max-restarts", "1")
    assert "--max_restarts=4" in dry_run("--max-restarts", "4", "--", "train", "--config", CONFIG, "run.max_restarts=3")
    assert "--max_restarts=5" in dry_run("--", "train", "--config", CONFIG, env={"MAX_RESTARTS": "5"})


def test_a_bad_config_exits_2_before_torchrun_starts():
    result = run([str(TRAIN), "--nproc", "2", "--", "train", "--config", CONFIG, "run.max_restarts=-1"])
    assert result.returncode == 2 and "run.max_restarts: expected >= 0" in result.stderr, result.stderr
    assert "torch.distributed" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_elastic_node_counts_reach_torchrun():
    cmd = dry_run("--nnodes", "1:2", "--node-rank", "1", "--rdzv", "10.0.0.1:29400", "train")
    assert "--nnodes=1:2" in cmd
    result = run([str(TRAIN), "--nnodes", "3:2", "--rdzv", "h:1", "train"])
    assert result.returncode == 2 and "MIN must be <= MAX" in result.stderr


def test_multinode_needs_no_ray_for_a_job_without_it():
    env = {"NODE_RANK": "0", "NNODES": "2", "RDZV_ENDPOINT": "10.0.0.1:29400", "RAY_JOIN": "no"}
    result = run([str(MULTINODE), "--dry-run", "--", "train", "--config", CONFIG], env)
    assert result.returncode == 0, result.stderr
    (torchrun,) = result.stdout.strip().splitlines()
    assert shlex.split(torchrun)[-3:] == ["train", "--config", CONFIG]


def test_wait_for_sh_waits_for_a_non_empty_file(tmp_path):
    target = tmp_path / "metrics.json"
    waiter = subprocess.Popen(
        [str(REPO / "launch" / "wait_for.sh"), "--every", "0.1", str(target)], stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.5)
    assert waiter.poll() is None
    target.write_text("{}")
    assert waiter.wait(timeout=10) == 0
    result = run([str(REPO / "launch" / "wait_for.sh"), "--timeout", "1", "--every", "0.2", str(tmp_path / "never")])
    assert result.returncode == 1 and "did not appear within 1 s" in result.stderr


def test_multinode_sh_names_each_missing_variable():
    result = run([str(MULTINODE), "train"], {"NNODES": "2", "RDZV_ENDPOINT": "h:1", "MOREC_RAY_ADDRESS": "h:2"})
    assert result.returncode == 2 and "NODE_RANK is not set" in result.stderr
    result = run([str(MULTINODE), "train"], {"NODE_RANK": "0", "NNODES": "2", "RDZV_ENDPOINT": "h:1"})
    assert result.returncode == 2 and "MOREC_RAY_ADDRESS is not set" in result.stderr


# ----------------------------------------------------------------------- real runs


def inspected(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_train_sh_starts_the_ranks_on_one_machine(small_synthetic):
    result = run([str(TRAIN), "--nproc", "2", "--", "inspect", str(small_synthetic), "--json"], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    # `inspect --json` prints one indented JSON document per rank
    assert result.stdout.count('"users": 500') == 2, result.stdout[-2000:]


@pytest.mark.slow
def test_two_nodes_meet_through_c10d_on_loopback(small_synthetic):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                str(TRAIN),
                "--nproc",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--rdzv",
                endpoint,
                "--rdzv-id",
                "launch-test",
                "--bind",  # node 0's rendezvous store on loopback only (morec_dist.train.bind)
                "127.0.0.1",
                "--",
                "inspect",
                str(small_synthetic),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for node in nodes:
        try:
            stdout, stderr = node.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            raise
        outputs.append((node.returncode, stdout, stderr))
    for rank, (code, stdout, stderr) in enumerate(outputs):
        assert code == 0, f"node {rank}: {stderr[-3000:]}"
        assert stdout.count('"users": 500') == 1, f"node {rank}: {stdout[-1000:]}"


@pytest.mark.slow
def test_ray_head_starts_serves_a_driver_and_stops(tmp_path):
    port = free_port()
    env = {"MOREC_RAY_STATE": str(tmp_path / "head"), "RAY_USAGE_STATS_ENABLED": "0"}
    started = run([str(RAY_HEAD), "--port", str(port), "--object-store-mb", "100"], env, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"127.0.0.1:{port}"
        again = run([str(RAY_HEAD), "--port", str(port)], env)
        assert again.returncode == 2 and "already runs on port" in again.stderr
        driver = (
            "import ray\n"
            f"ray.init(address='127.0.0.1:{port}', logging_level='WARNING', log_to_driver=False)\n"
            "f = ray.remote(lambda x: x * 2)\n"
            "print(ray.get(f.remote(21)), sorted({n['NodeManagerAddress'] for n in ray.nodes()}))\n"
        )
        result = run(
            [sys.executable, "-c", driver],
            {**env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip() == "42 ['127.0.0.1']"  # loopback only by default
    finally:
        pgid_file = tmp_path / f"head-{port}" / "pgid"
        pgid = int(pgid_file.read_text()) if pgid_file.exists() else None
        stopped = run([str(RAY_HEAD), "--stop", "--port", str(port)], env)
    assert stopped.returncode == 0, stopped.stderr
    assert pgid is not None
    assert not live_members(pgid), "processes of the head's group survived --stop"


def live_members(pgid: int) -> list[int]:
    """Processes of a group that still run (zombies waiting to be reaped do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members
