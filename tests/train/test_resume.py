"""A run stopped by SIGTERM, or killed by SIGKILL at random moments, and restarted ends exactly where an uninterrupted
run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
ARGS = [
    "--config", "configs/v1.py", "--config.train.num_steps=12", "--config.optimizer.warmup_steps=2",
    "--config.data.batch_size=16", "--config.data.max_eval_images=300", "--config.train.precise_bn_images=64",
    "--config.train.checkpoint_every_steps=3", "--config.train.log_every_steps=1", "--config.train.progress=False",
]


def start(workdir, extra=()):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "train.py", "--workdir", str(workdir), *ARGS, *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_steps_logged(workdir):
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if '"train"' in line), default=0)


def final_params(workdir):
    directory = Path(workdir) / "checkpoints"
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    return step, jax.tree.map(np.asarray, {k: state[k] for k in ("params", "batch_stats", "opt_state", "step")})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    out, _ = start(full).communicate(timeout=1200)
    assert (full / "final_metrics.json").exists(), out[-3000:]
    return full


def assert_same_run(a_dir, b_dir):
    step_a, a = final_params(a_dir)
    step_b, b = final_params(b_dir)
    assert step_a == step_b == 12
    jax.tree.map(np.testing.assert_array_equal, a, b)
    ma = json.loads((a_dir / "final_metrics.json").read_text())
    mb = json.loads((b_dir / "final_metrics.json").read_text())
    for key in ("precision_at_1", "map", "map_at_r", "recall_at_5"):
        assert ma[key] == mb[key], key


def test_sigterm_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    interrupted = tmp_path / "interrupted"
    proc = start(interrupted)
    deadline = time.time() + 1200
    while train_steps_logged(interrupted) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "rerun the same command to resume" in out
    assert not (interrupted / "final_metrics.json").exists()
    stopped_at, _ = final_params(interrupted)
    assert 4 <= stopped_at < 12, out[-3000:]  # saved at the signal, not only at the periodic checkpoints (every 3 steps)

    out, _ = start(interrupted).communicate(timeout=1200)
    assert f"resumed from {interrupted / 'checkpoints'} at step {stopped_at}" in out, out[-3000:]
    assert_same_run(uninterrupted, interrupted)


def finalized_steps(workdir):
    """Checkpoint steps orbax has committed: a save in flight lives in a temporary directory until renamed, and a
    committed step directory carries its metadata and commit marker."""
    directory = Path(workdir) / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file() and (p / "commit_success.txt").is_file())


def logged_lines(workdir):
    path = Path(workdir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_at_random_moments_never_loads_a_partial_checkpoint(uninterrupted, tmp_path):
    """SIGKILL (no handler runs) twice at random points, kills landing during asynchronous saves too; each
    restart resumes from the last committed checkpoint, and the run ends bit-identical to an uninterrupted one."""
    killed = tmp_path / "killed"
    rng = np.random.default_rng(7)
    committed, resumed = [], 0
    for attempt in range(2):
        before = logged_lines(killed)
        proc = start(killed)
        wanted = before + int(rng.integers(4, 7))  # past the first periodic checkpoint (step 3), so restarts resume
        deadline = time.time() + 600
        while (logged_lines(killed) < wanted or not finalized_steps(killed)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # past a committed checkpoint, so the restart has one to resume from
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.kill()
        out, _ = proc.communicate(timeout=120)
        if committed:
            assert f"resumed from {killed / 'checkpoints'} at step {committed[-1]}" in out, out[-3000:]
            resumed += 1
        assert proc.returncode in (-signal.SIGKILL, 0), out[-3000:]
        committed = finalized_steps(killed)
        if proc.returncode == 0:
            break

    out, _ = start(killed).communicate(timeout=1200)
    if committed and committed[-1] < 12:
        assert f"resumed from {killed / 'checkpoints'} at step {committed[-1]}" in out, out[-3000:]
        resumed += 1
    assert resumed >= 1, "no restart resumed from a checkpoint: the test did not exercise recovery"
    assert_same_run(uninterrupted, killed)
