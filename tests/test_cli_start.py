"""The CLI's process start and end (morec_dist/lazy.py, morec_dist/fast_exit.py).

- Building the parser and importing what the launcher needs to start torchrun (the
  coordinator's service module, the method table, the packages' re-exports) loads neither
  torch nor TorchRec: the ranks import them, the launcher must not pay for them twice; nor
  does the launcher's whole edge (every name checked, the dataset verified, the checkpoint's
  meta read) up to the moment it starts torchrun.
- ``exit_without_final_gc`` exits with the given code and still runs atexit handlers and
  flushes what was written (it only skips the collection of cyclic garbage).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "torchrec", "fbgemm_gpu", "numba")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_the_launchers_imports_load_no_training_stack():
    proc = run_python(
        "import sys\n"
        "from morec_dist.cli import build_parser\n"
        "build_parser().parse_args(['train', '--config', 'x.toml'])\n"
        "import morec_dist.coordinator, morec_dist.eval, morec_dist.model\n"
        "from morec_dist.coordinator.service import start_local_ray\n"
        "from morec_dist.train.launch import relaunch\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


# the launcher's whole path up to starting torchrun, each command as a user types it; the
# process spawn is the one seam replaced (the subject is what the launcher imported before it)
UP_TO_TORCHRUN = """
import json, sys
import morec_dist.coordinator.service as service
import morec_dist.train.launch as launch

def at_torchrun(nproc, argv, max_restarts=0):
    heavy = sorted(m for m in {heavy!r} if m in sys.modules)
    print(json.dumps({{"argv": argv, "heavy": heavy}}))
    return 0

launch.relaunch = at_torchrun
service.start_local_ray = lambda *a, **k: "127.0.0.1:6379"  # Ray itself is the ranks' coordinator
from morec_dist.cli import main
sys.exit(main(json.loads(sys.argv[1])))
"""


def launch_up_to_torchrun(argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", UP_TO_TORCHRUN.format(heavy=HEAVY), json.dumps(argv)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_finetune_and_evaluate_reach_torchrun_without_the_training_stack(small_synthetic, tmp_path):
    """The whole edge (config, plugins, every registry name and the model's options, the
    dataset fully verified, the objectives and their signals, the checkpoint's meta.json)
    runs in the launcher without torch or TorchRec: the ranks load them, once."""
    from morec_dist.config import Config

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    config = Config().to_dict()
    config["data"]["path"] = str(small_synthetic)
    (checkpoint / "meta.json").write_text(json.dumps({"config": config}))
    data = f'data.path="{small_synthetic}"'
    out = f'run.out_dir="{tmp_path / "run"}"'
    for argv in (
        ["train", "--config", "tests/configs/tiny.toml", data, out, "model.name=two_tower", "model.loss=bpr"],
        ["finetune", "--from", str(checkpoint), "--config", "tests/configs/tiny.toml", data, out],
        ["finetune", "--from", str(checkpoint), "--method", "epo", data, out],
        ["evaluate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.json")],
    ):
        reached = launch_up_to_torchrun(argv)
        assert reached["argv"][0] == argv[0], reached
        assert reached["heavy"] == [], (argv[0], reached)


def test_the_packages_re_exports_still_resolve():
    proc = run_python(
        "import morec_dist.coordinator as c, morec_dist.eval as e, morec_dist.model as m\n"
        "for pkg in (c, e, m):\n"
        "    for name in pkg.__all__:\n"
        "        getattr(pkg, name)\n"
        "try:\n"
        "    c.no_such_name\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "module 'morec_dist.coordinator' has no attribute 'no_such_name'" in proc.stdout


def test_fast_exit_keeps_the_code_atexit_and_buffered_output(tmp_path):
    marker = tmp_path / "atexit-ran"
    proc = run_python(
        "import atexit, sys, torch\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "sys.stdout.write('buffered, no newline')\n"
        "from morec_dist.fast_exit import exit_without_final_gc\n"
        "exit_without_final_gc(3)\n"
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout == "buffered, no newline"
    assert marker.read_text() == "yes"


def test_the_ranks_get_one_thread_unless_the_user_says_otherwise():
    from morec_dist.train.launch import rank_env

    env = rank_env({"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0" and env["PATH"] == "/bin"
    assert rank_env({"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"
