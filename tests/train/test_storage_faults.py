"""Storage faults on real (small) filesystems: a full disk during a checkpoint save and a read-only workdir give one
clear message, and the checkpoint written before the fault stays complete and loadable."""

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.train.test_resume import ARGS, ROOT, final_params, finalized_steps

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def tmpfs(size: str, read_only: bool = False):
    """A tmpfs of `size` (needs root, as in CI and this project's dev machines)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    path = Path(tempfile.mkdtemp(prefix="resmobile_fs_"))
    opts = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def train(workdir, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "train.py", "--workdir", str(workdir), *ARGS, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    # One checkpoint (params, EMA, both Adam moments, BN stats) is ~50 MB: the first fits in 80 MB, the second cannot.
    with tmpfs("80m") as fs:
        workdir = fs / "run"
        out = train(workdir, "--config.train.async_checkpoints=False")
        assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
        # orbax's writer threads may still be printing their own traceback while the process exits, so the message
        # can share a line with their output: find it anywhere.
        at = out.stderr.find("error: could not write")
        err = out.stderr[at:].splitlines()[0] if at >= 0 else ""
        assert "No space left on device" in err, out.stderr[:3000] + out.stderr[-3000:]
        assert f"the last complete checkpoint is step 3 in {workdir / 'checkpoints'}" in err
        assert "rerun the same command to resume" in err
        assert finalized_steps(workdir) == [3]
        step, state = final_params(workdir)  # complete and loadable, every tensor there
        assert step == 3 and int(state["step"]) == 3 and len(state["params"]) > 0


def test_read_only_workdir_is_refused_before_training():
    with tmpfs("1m", read_only=True) as fs:
        out = train(fs / "run")
        assert out.returncode == 1
        assert f"error: --workdir {fs / 'run'} is not writable (Read-only file system)" in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
