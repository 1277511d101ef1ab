"""Data parallelism: the same train steps on 1 device and on 2 processes x 2 simulated devices
(jax.distributed over localhost with CPU collectives), the project's stand-in for a TPU pod."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow
HELPER = os.path.join(os.path.dirname(__file__), "sharded_steps.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def run_helper(out, devices, process_id=None, num_processes=None, port=None, steps=2):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=ROOT,
               TF_CPP_MIN_LOG_LEVEL="2")
    if process_id is not None:
        env.update(RESMOBILE_COORDINATOR=f"localhost:{port}", RESMOBILE_NUM_PROCESSES=str(num_processes),
                   RESMOBILE_PROCESS_ID=str(process_id))
    return subprocess.Popen([sys.executable, HELPER, str(out), str(steps)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=900):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def assert_same_training(a_file, b_file, rel=2e-3):
    """Every tensor's parameter update and BatchNorm statistics agree to `rel` of their norm. A per-device BatchNorm
    or a per-shard loss changes updates by O(1) of their norm, so this separates right from wrong while allowing
    float32 reduction-order noise."""
    a, b = np.load(a_file), np.load(b_file)
    assert set(a.files) == set(b.files)
    worst = 0.0
    for k in a.files:
        if k in ("devices", "loss") or k.endswith("num_batches_tracked.value"):
            continue
        # The 1e-6 floor covers tensors that are ~0: updates of params whose true gradient is 0 (the head fc bias feeds a
        # BatchNorm) and running means near 0, where the value itself is float32 rounding noise.
        diff, norm = np.linalg.norm(a[k] - b[k]), np.linalg.norm(a[k])
        worst = max(worst, diff / max(norm, 1e-12))
        assert diff < rel * norm + 1e-6, f"{k}: difference {diff:.2e}, update norm {norm:.2e}"
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)
    return worst


def test_one_device_equals_two_processes_of_two_devices(tmp_path):
    """One compile per configuration is what makes this test slow (minutes on 2 cores), so it runs two: a single
    device, and a 4-device global mesh spread over two processes. Cross-device BatchNorm, the global loss and the
    gradient all-reduce must make them train identically; multi-device within one process is the same code path."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    one, multi = tmp_path / "one.npz", tmp_path / "multi.npz"
    procs = [run_helper(multi, 2, i, 2, port) for i in range(2)]
    for p in procs:
        finish(p)
    finish(run_helper(one, 1))
    assert int(np.load(multi)["devices"]) == 4 and int(np.load(one)["devices"]) == 1
    assert_same_training(one, multi)
