"""An S3-compatible server (moto's server mode) on loopback for the tests that read and
write s3:// datasets: the real S3 protocol through pyarrow's S3 filesystem, no mocks.

moto accepts any credentials: the fake AWS_* below are set only inside ``moto_s3`` (never
the machine's real ones), and the URI query carries the endpoint, as a user's would.
``S3Server.hold`` stalls the uploads whose key matches a pattern (a slow store) until the
test lets them go, then fails them as a lost connection would: the place to kill a job
mid-save, deterministically.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass(frozen=True)
class S3Server:
    host: str
    port: int
    bucket: str
    counter: _RequestCounter = field(compare=False, repr=False)
    gate: _Gate = field(compare=False, repr=False)

    @contextlib.contextmanager
    def hold(self, key_pattern: str) -> Iterator[threading.Event]:
        """Uploads (PUT / POST) to keys matching ``key_pattern`` wait inside the server until
        the block ends, then get a 503; yields the event set when the first one arrives."""
        self.gate.pattern = re.compile(key_pattern)
        self.gate.arrived.clear()
        self.gate.release.clear()
        try:
            yield self.gate.arrived
        finally:
            self.gate.release.set()
            self.gate.pattern = None

    @property
    def requests(self) -> int:
        """HTTP requests the server has answered so far (from its access log)."""
        return self.counter.count

    @property
    def query(self) -> str:
        return f"?endpoint_override={self.host}:{self.port}&scheme=http&region=us-east-1"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}{self.query}"

    def upload(self, local: Path, key: str) -> str:
        """Copies a local directory under s3://bucket/key; returns its URI."""
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(self.uri(key))
        pafs.copy_files(str(local), path, destination_filesystem=fs)
        return self.uri(key)


class _Gate:
    """WSGI middleware in front of moto: holds the matching uploads (see ``S3Server.hold``)."""

    def __init__(self, app):
        self.app = app
        self.pattern: re.Pattern | None = None
        self.arrived = threading.Event()
        self.release = threading.Event()

    def __call__(self, environ, start_response):
        pattern = self.pattern
        if (
            pattern is not None
            and environ.get("REQUEST_METHOD") in ("PUT", "POST")
            and pattern.search(environ.get("PATH_INFO", ""))
        ):
            self.arrived.set()
            self.release.wait(300)
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"held by the test, then dropped"]
        return self.app(environ, start_response)


class _RequestCounter(logging.Handler):
    """Counts the server's access-log lines (one per HTTP request) and keeps them off stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "HTTP/1." in record.getMessage():
            self.count += 1


@contextlib.contextmanager
def moto_s3(bucket: str = "data") -> Iterator[S3Server]:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAKE_AWS.items():
            patch.setenv(key, value)
        access_log = logging.getLogger("werkzeug")
        counter = _RequestCounter()
        patch.setattr(access_log, "propagate", False)
        patch.setattr(access_log, "level", logging.INFO)
        access_log.addHandler(counter)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            wsgi = server._server
            assert wsgi is not None, "started above"
            gate = _Gate(wsgi.app)  # the WSGI app the request handler looks up per request
            wsgi.app = gate
            host, port = server.get_host_and_port()
            boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(
                Bucket=bucket
            )
            yield S3Server(host, port, bucket, counter, gate)
        finally:
            server.stop()
            access_log.removeHandler(counter)
