"""A real Prometheus server for tests: started on loopback with a generated scrape config.

The server is Debian's ``prometheus`` package (``tests/tools/install_prometheus.sh``, which
``make test`` runs, and which ``start`` runs itself when the binary is missing).
``PrometheusServer.start`` writes a config that scrapes the given targets every second,
starts the binary with its storage in a temp dir, waits until ``/-/ready`` answers, and
offers queries over the HTTP API. A test module uses the ``prometheus`` fixture below
(loaded for every module by conftest.py) after defining a module-scoped
``prometheus_targets`` fixture (job name -> ``host:port`` list); the server then runs once
per module.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

PROMETHEUS_BIN = Path("/usr/bin/prometheus")
INSTALLER = Path(__file__).resolve().parent / "tools" / "install_prometheus.sh"
SCRAPE_INTERVAL_S = 1


class PrometheusError(RuntimeError):
    """The server did not start, or a query failed."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_range(count: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """A base port such that base .. base + count - 1 are all free right now."""
    for _ in range(tries):
        base = free_port(host)
        if base + count > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise PrometheusError(f"no {count} consecutive free ports on {host} after {tries} tries")


def ensure_installed() -> None:
    """Run the installer when the binary is missing (make test runs it first anyway)."""
    if PROMETHEUS_BIN.exists():
        return
    result = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not PROMETHEUS_BIN.exists():
        raise PrometheusError(f"{PROMETHEUS_BIN} is missing and `bash {INSTALLER}` failed:\n{result.stderr[-3000:]}")


def scrape_config(targets: Mapping[str, Sequence[str]]) -> str:
    """The prometheus.yml text: one job per entry, scraped every second. JSON is valid YAML."""
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "scrape_configs": [
            {"job_name": job, "scrape_interval": f"{SCRAPE_INTERVAL_S}s", "static_configs": [{"targets": list(hosts)}]}
            for job, hosts in targets.items()
        ],
    }
    return json.dumps(config, indent=1)


class PrometheusServer:
    """One Prometheus process; ``query`` / ``wait_for`` use its HTTP API."""

    def __init__(self, process: subprocess.Popen, port: int, workdir: Path) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir
        self.base_url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, targets: Mapping[str, Sequence[str]], workdir: Path, timeout_s: float = 60.0) -> PrometheusServer:
        ensure_installed()
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(scrape_config(targets))
        port = free_port()
        log = open(workdir / "prometheus.log", "wb")
        process = subprocess.Popen(
            [
                str(PROMETHEUS_BIN),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        server = cls(process, port, workdir)
        try:
            server._wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def api(self, path: str, params: Mapping[str, str] | Sequence[tuple[str, str]]) -> dict[str, Any]:
        """GET /api/v1/<path>; returns the decoded body (errors come back as status 'error')."""
        url = f"{self.base_url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body
            return json.loads(exc.read())

    def query_raw(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", params)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector of ``expr``; raises on a failed query."""
        body = self.query_raw(expr, at)
        if body.get("status") != "success":
            raise PrometheusError(f"query {expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def values(self, expr: str, by: str) -> dict[str, float]:
        """``{label value: sample value}`` of an instant query, keyed by one label."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(expr)}

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        if len(result) != 1:
            raise PrometheusError(f"query {expr!r}: expected one series, got {result}")
        return float(result[0]["value"][1])

    def wait_for(
        self, expr: str, ok: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 30.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if ok(result):
                return result
            time.sleep(0.25)
        raise PrometheusError(f"{expr!r} did not reach the expected state within {timeout_s}s; last result {result}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def prometheus(prometheus_targets: Mapping[str, Sequence[str]], tmp_path_factory) -> Iterator[PrometheusServer]:
    """A real Prometheus scraping ``prometheus_targets`` (a fixture the test module defines)."""
    workdir = tmp_path_factory.mktemp("prometheus")
    server = PrometheusServer.start(prometheus_targets, workdir)
    yield server
    server.stop()
    shutil.rmtree(workdir / "data", ignore_errors=True)
