"""A real two-machine MoRec run: two hosts made as network namespaces joined by a veth pair.

Host A runs the Ray head (launch/ray_head.sh) and node 0 of the job; host B joins the Ray
cluster as a worker node and runs node 1 (launch/multinode.sh); torchrun's c10d rendezvous
and gloo cross the veth. Host B gets a private /tmp/ray (a mount namespace) so the two
Ray nodes do not share session sockets, as two machines would not. The run must complete
and match a single-host run with the same seed and world size bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from tests.conftest import REPO, skip_or_fail_in_ci
from tests.e2e_fixtures import CONFIG, quoted, shared_finetune

pytestmark = pytest.mark.slow
SUBNET = "10.213.7"
HOST_A, HOST_B = f"{SUBNET}.1", f"{SUBNET}.2"


def run(*cmd: str, check: bool = True, timeout: int = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        skip_or_fail_in_ci("needs root, iproute2 and unshare to make network namespaces")
    tag = uuid.uuid4().hex[:6]
    a, b = f"morec-a-{tag}", f"morec-b-{tag}"
    veth_a, veth_b = f"va{tag}", f"vb{tag}"
    run("ip", "netns", "add", a)
    run("ip", "netns", "add", b)
    try:
        run("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        run("ip", "link", "set", veth_a, "netns", a)
        run("ip", "link", "set", veth_b, "netns", b)
        for ns, dev, addr in ((a, veth_a, HOST_A), (b, veth_b, HOST_B)):
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        run("ip", "netns", "exec", a, "ping", "-c", "1", "-W", "2", HOST_B, check=False)
        yield {"a": (a, veth_a), "b": (b, veth_b)}
    finally:
        run("ip", "netns", "del", a, check=False)
        run("ip", "netns", "del", b, check=False)


def test_two_hosts_match_the_single_host_run(two_hosts, pretrained, tiny_data, tmp_path_factory, tmp_path):
    (ns_a, dev_a), (ns_b, dev_b) = two_hosts["a"], two_hosts["b"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MOREC_RAY_STATE": str(tmp_path / "ray-head")}
    ray_port, rdzv = 6391, f"{HOST_A}:29517"
    head = run(
        "ip",
        "netns",
        "exec",
        ns_a,
        "bash",
        str(REPO / "launch" / "ray_head.sh"),
        "--host",
        HOST_A,
        "--port",
        str(ray_port),
        "--num-cpus",
        "2",
        "--object-store-mb",
        "100",
        check=False,
        timeout=180,
        env=env,
    )
    assert head.returncode == 0, head.stderr
    out = tmp_path / "two-hosts"
    args = [
        "finetune",
        "--from",
        str(pretrained),
        "--config",
        CONFIG,
        quoted("data.path", tiny_data),
        quoted("run.out_dir", out),
    ]
    try:
        node_env = {
            **env,
            "NNODES": "2",
            "RDZV_ENDPOINT": rdzv,
            "MOREC_RAY_ADDRESS": f"{HOST_A}:{ray_port}",
            "RDZV_ID": out.name,
        }
        node0 = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns_a,
                "env",
                "NODE_RANK=0",
                f"LOCAL_ADDR={HOST_A}",
                f"GLOO_SOCKET_IFNAME={dev_a}",
                "bash",
                str(REPO / "launch" / "multinode.sh"),
                "--",
                *args,
            ],
            env=node_env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "node0.log", "w"),
        )
        # host B: its own /tmp/ray, as a separate machine would have
        inner = (
            f"mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray && exec env NODE_RANK=1 LOCAL_ADDR={HOST_B} "
            f"RAY_NODE_IP={HOST_B} "
            f"GLOO_SOCKET_IFNAME={dev_b} bash {REPO / 'launch' / 'multinode.sh'} -- " + " ".join(f"'{x}'" for x in args)
        )
        node1 = subprocess.Popen(
            ["ip", "netns", "exec", ns_b, "unshare", "--mount", "--propagation", "private", "bash", "-c", inner],
            env=node_env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "node1.log", "w"),
        )
        for node, log in ((node0, "node0.log"), (node1, "node1.log")):
            try:
                node.wait(timeout=600)
            finally:
                if node.poll() is None:
                    node.kill()
            assert node.returncode == 0, (tmp_path / log).read_text()[-4000:]
    finally:
        run(
            "ip",
            "netns",
            "exec",
            ns_a,
            "bash",
            str(REPO / "launch" / "ray_head.sh"),
            "--stop",
            "--port",
            str(ray_port),
            check=False,
            timeout=120,
            env=env,
        )
    two = json.loads((out / "metrics.json").read_text())
    one = json.loads((shared_finetune(tmp_path_factory) / "metrics.json").read_text())  # the session's one-host run
    assert two["world_size"] == one["world_size"] == 2
    assert two["coordinator"]["trace"]["beta"] == one["coordinator"]["trace"]["beta"]
    for key in ("hit@10", "ndcg@10", "r_hit@10", "r_ndcg@10", "min_hit@10", "min_ndcg@10", "pop_kl@10"):
        assert two[key] == one[key], key
