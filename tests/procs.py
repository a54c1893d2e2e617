"""Run a job the way a test needs it: the whole job, torchrun's ranks included, ends with
the call, on success, failure or timeout.

``subprocess.run(timeout=...)`` kills only its direct child, and ``os.killpg`` on a job's
group misses torchrun's ranks (torch's elastic agent starts each rank with
``start_new_session=True``, a group of its own), so a timed-out ``morec`` job would leave
ranks and a Ray head running into the next test. ``run_job`` starts the job in a session
of its own, tags it with an environment variable every descendant inherits (ranks, Ray's
processes), and afterwards ends the group and every process still carrying the tag,
whatever session it moved to or whoever it was re-parented to.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import typing
import uuid
from pathlib import Path

TAG = "MOREC_TEST_JOB"
# a job asked to stop (SIGTERM) gets this long to clean up (launch.py's temporary
# directory, the ranks' process group) before everything left is SIGKILLed
GRACE_S = 10.0


def tagged(tag: str) -> list[int]:
    """Processes whose environment holds ``TAG=tag`` (this machine, readable ones)."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def end_job(leader: subprocess.Popen, tag: str, grace_s: float = GRACE_S) -> None:
    """SIGTERM the job's group, wait up to ``grace_s`` for the leader, then SIGKILL its
    group and every process still tagged; returns when none of them is left running."""
    if leader.poll() is None:
        _signal_group(leader.pid, signal.SIGTERM)
        try:
            leader.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(leader.pid, signal.SIGKILL)
    # remembered by pid and start time: a process dying of SIGKILL releases its memory
    # (its environ then reads empty, so it is no longer "tagged") before it becomes a
    # zombie, so waiting on ``tagged`` alone could return while it still runs
    killed = {pid: _start_time(pid) for pid in tagged(tag)}
    for pid in killed:
        _signal(pid, signal.SIGKILL)
    leader.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        any(_running(pid, started) for pid, started in killed.items()) or any(_running(pid) for pid in tagged(tag))
    ):
        time.sleep(0.05)


def run_job(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)``, except
    that the whole job is ended on return, on timeout and on any error in between.

    Output goes to files, not pipes: a process the job left behind would hold a pipe open,
    and waiting for its end of file would turn a finished job into a timeout."""
    tag = uuid.uuid4().hex
    job_env = {**(os.environ if env is None else env), TAG: tag}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        leader = subprocess.Popen(
            cmd,
            env=job_env,
            cwd=cwd,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,  # its own group: one killpg reaches the job's direct processes
        )
        try:
            leader.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            end_job(leader, tag)
            raise subprocess.TimeoutExpired(cmd, timeout, output=_read(out), stderr=_read(err)) from exc
        finally:
            end_job(leader, tag)  # also what a finished job left behind (an orphaned rank)
        return subprocess.CompletedProcess(cmd, leader.returncode, _read(out), _read(err))


def _read(file: typing.IO[str]) -> str:
    file.seek(0)
    return file.read()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is empty already
        pass


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (state first), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None  # field 22 of stat: start time in clock ticks


def _running(pid: int, started: str | None = None) -> bool:
    """Alive and not a zombie or dead (neither holds resources; the parent reaps it); with
    ``started``, only the process that had that start time (a reused pid is another)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or fields[19] == started
