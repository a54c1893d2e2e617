"""What a single-host job listens on, and what it records with ``eval.ks`` set: one real
2-rank ``morec run`` (pretraining, then MoRec fine-tuning with its embedded Ray head and the
metrics exporters) on the shared tiny dataset with ``eval.ks = [5, 20]``, read by two tests.

It must open no listening socket outside loopback (docs/deploy.md, "What listens where").
The job's processes are found by a marker in their environment, which torchrun's agent, the
ranks, Ray's head processes and its workers all inherit; their listening sockets come from
``/proc/<pid>/fd`` matched against ``/proc/net/tcp`` and ``tcp6``, sampled while it runs.

The job runner with K from config: every record of both stages (per-epoch validation, test,
the most-popular baseline, the selected epoch, the fine-tuning's starting point) carries @5
and @20 metrics and no @10, the progress lines name them, and the results table is at
``eval.ks[0]``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e_fixtures import CONFIG, quoted
from tests.test_metrics import free_base_port

MARKER_ENV = "MOREC_LISTENER_PROBE"
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def _address(hex_addr: str) -> str:
    """``/proc/net/tcp*``'s ``ADDR:PORT`` (the address in 32-bit host-order words) as text."""
    addr, port = hex_addr.split(":")
    raw = b"".join(bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, len(addr), 8))
    return f"{ipaddress.ip_address(raw)}:{int(port, 16)}"


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # an IPv6 socket bound to ::ffff:127.0.0.1
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def listening_inodes() -> dict[str, str]:
    """inode -> local address of every TCP socket in LISTEN state (IPv4 and IPv6)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN:
                found[fields[9]] = _address(fields[1])
    return found


def marked_pids(marker: str) -> list[int]:
    needle = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone, or another user's
                continue
    return pids


def job_listeners(marker: str) -> set[tuple[str, str, int]]:
    """(local address, process name, pid) of every listening socket the job's processes hold."""
    listening = listening_inodes()
    held = set()
    for pid in marked_pids(marker):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
            if inode in listening:
                held.add((listening[inode], name, pid))
    return held


LISTENER = """
import socket, sys
local, anywhere = socket.socket(), socket.socket(socket.AF_INET6)
local.bind(("127.0.0.1", 0)); anywhere.bind(("::", 0)); local.listen(); anywhere.listen()
print(local.getsockname()[1], anywhere.getsockname()[1], flush=True)
sys.stdin.read()
"""


def test_a_marked_process_listeners_are_read_back_and_classified():
    # a marked child listening on loopback and on every interface: found, and told apart
    marker = uuid.uuid4().hex
    child = subprocess.Popen(
        [sys.executable, "-c", LISTENER],
        env={**os.environ, MARKER_ENV: marker},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        local, anywhere = child.stdout.readline().split()
        seen = {addr for addr, _, pid in job_listeners(marker) if pid == child.pid}
    finally:
        child.kill()
        child.wait()
    assert seen == {f"127.0.0.1:{local}", f":::{anywhere}"}
    assert job_listeners(uuid.uuid4().hex) == set()
    assert is_loopback("127.0.0.1:1") and is_loopback("::1:1") and is_loopback("::ffff:127.0.0.1:1")
    assert not is_loopback("0.0.0.0:1") and not is_loopback(":::1") and not is_loopback("192.0.2.2:1")


def own_listeners() -> set[str]:
    listening = listening_inodes()
    links = [os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink()]
    return {listening[link[8:-1]] for link in links if link[8:-1] in listening}


def test_a_bound_store_listens_on_the_named_address_only():
    import torch.distributed as dist

    from morec_dist.train.bind import bound_store_class

    before = own_listeners()
    plain = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    bound = bound_store_class("127.0.0.1")("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", bound.port, is_master=False, multi_tenant=True)
    client.set("key", "value")
    assert bound.get("key") == b"value"
    # torch's own store listens on every interface whatever host it is given; the bound one on loopback
    new = own_listeners() - before
    assert len(new) == 2 and f"127.0.0.1:{bound.port}" in new, new
    (unbound,) = new - {f"127.0.0.1:{bound.port}"}
    assert unbound.endswith(f":{plain.port}") and not is_loopback(unbound), new


def test_bind_refuses_a_host_name_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "morec_dist.train.bind", "--bind", "localhost", "--standalone"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "--bind: expected an IP address (e.g. 127.0.0.1), got 'localhost'"


KS = "eval.ks=[5, 20]"


@pytest.fixture(scope="module")
def single_host_run(tiny_data, tmp_path_factory) -> tuple[set[tuple[str, str, int]], Path, str, int]:
    """The module's job, run once: (its listeners as sampled while it ran, its out_dir, what
    it printed, the exporters' base port)."""
    marker = uuid.uuid4().hex
    base = free_base_port(3)  # the exporters are on: they must bind loopback too
    tmp_path = tmp_path_factory.mktemp("single-host-run")
    log = tmp_path / "run.log"
    command = [
        sys.executable,
        "-m",
        "morec_dist.cli",
        "run",
        "--config",
        CONFIG,
        quoted("data.path", tiny_data),
        quoted("run.out_dir", tmp_path / "run"),
        "metrics.enabled=true",
        f"metrics.base_port={base}",
        KS,
    ]
    env = {**os.environ, MARKER_ENV: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    seen: set[tuple[str, str, int]] = set()
    with open(log, "w") as out:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while job.poll() is None and time.monotonic() < deadline:
            seen |= job_listeners(marker)
            time.sleep(0.2)
        if job.poll() is None:
            job.kill()
    assert job.wait() == 0, log.read_text()[-4000:]
    return seen, tmp_path / "run", log.read_text(), base


@pytest.mark.slow
def test_a_single_host_run_listens_on_loopback_only(single_host_run):
    seen, _, _, base = single_host_run
    # it saw the job: both stages' torchrun agents (each hosts the rendezvous store), the
    # embedded Ray head of fine-tuning, and the exporters on their configured ports
    agents = {pid for _, name, pid in seen if name == "pt_elastic"}
    assert len(agents) >= 2, sorted(seen)
    assert any(name in ("gcs_server", "raylet") for _, name, _ in seen), sorted(seen)
    assert {f"127.0.0.1:{base + i}" for i in range(3)} <= {addr for addr, _, _ in seen}, sorted(seen)
    exposed = sorted((addr, name) for addr, name, _ in seen if not is_loopback(addr))
    assert not exposed, f"listening outside loopback: {exposed}"


def has_ks(metrics: dict) -> None:
    for name in ("hit", "ndcg", "r_hit", "r_ndcg", "min_hit", "min_ndcg", "pop_kl"):
        assert f"{name}@5" in metrics and f"{name}@20" in metrics, name
        assert f"{name}@10" not in metrics, name


@pytest.mark.slow
def test_records_carry_the_configured_ks(single_host_run):
    _, out, printed, _ = single_host_run
    epochs = [line for line in printed.splitlines() if line.startswith("[pretrain] epoch ")]
    assert epochs and all("valid ndcg@5" in line for line in epochs), printed[-4000:]
    assert "[pretrain] test hit@5" in printed, printed[-4000:]
    m = json.loads((out / "pretrain" / "metrics.json").read_text())
    has_ks(m)
    has_ks(m["baselines"]["most_popular"])
    has_ks(m["valid"])
    assert all(set(row["valid"]) == set(m["valid"]) for row in m["history"])
    assert "[morec] test hit@5" in printed, printed[-4000:]
    f = json.loads((out / "morec" / "metrics.json").read_text())
    has_ks(f)
    has_ks(f["valid_before"])
    has_ks(f["history"][0]["valid"])
    assert f["job"] == "finetune:morec" and f["checkpoints_written"]
    table = json.loads((out / "results.json").read_text())["table"]
    assert set(table) == {"most popular", "pretrain", "morec"}
    assert all("ndcg@5" in row and "ndcg@10" not in row for row in table.values()), table
