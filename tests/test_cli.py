"""cli.run: the entry points re-execute themselves once with the glibc malloc tunables, keeping argv and the user's
own tunables, and not at all when opted out (then XLA:CPU's async dispatch stays on too); they add the project's
XLA:CPU flags to XLA_FLAGS the same way."""

import os
import platform
import subprocess
import sys

import pytest

from resmobile_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ":".join(f"{k}={v}" for k, v in cli.MALLOC_TUNABLES.items())
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tunables are glibc's")

# A real entry point in miniature: absl flags, cli.run, and a main that reports what the process saw.
PROGRAM = """
import os, sys
from absl import flags
from resmobile_jax import cli
flags.DEFINE_integer("n", 0, "")
def main(argv):
    print(os.getpid(), repr(os.environ.get("GLIBC_TUNABLES")), flags.FLAGS.n, argv[1:], sep="|")
    print(heap_growth_from_a_256mb_malloc())
    print(repr(os.environ.get("XLA_FLAGS")), matmul_runs_on_ynnpack(), sep="|")
    import jax
    print(jax.config.values["jax_cpu_enable_async_dispatch"])
def matmul_runs_on_ynnpack():
    # What XLA did with the flags: the compiled program names the library each dot runs on.
    import jax, jax.numpy as jnp
    a = jnp.ones((256, 256), jnp.float32)
    return "ynn_fusion" in jax.jit(lambda a: a @ a).lower(a).compile().as_text()
def heap_growth_from_a_256mb_malloc():
    # What glibc did with the tunables: with mmap_max=0 a big block comes from the brk heap, not a fresh mapping.
    import ctypes
    def heap():
        with open("/proc/self/maps") as f:
            return sum(int(b, 16) - int(a, 16) for a, b in
                       (l.split()[0].split("-") for l in f if l.rstrip().endswith("[heap]")))
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    before = heap()
    block = libc.malloc(256 << 20)
    assert block
    return heap() - before >= 256 << 20
cli.run(main)
"""


def run_program(tmp_path, env_overrides, *args):
    script = tmp_path / "entry.py"
    script.write_text(PROGRAM)
    ours = ("GLIBC_TUNABLES", "RESMOBILE_MALLOC", cli._REEXEC_MARK, "XLA_FLAGS", "RESMOBILE_XLA_FLAGS")
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(env_overrides, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    lines = out.strip().splitlines()
    pid, tunables, n, argv = lines[-4].split("|")
    heap_malloc = lines[-3]
    xla_flags, ynn = lines[-2].split("|")
    return {"same_pid": int(pid) == proc.pid, "tunables": eval(tunables), "n": int(n), "argv": argv,
            "heap_malloc": heap_malloc == "True", "xla_flags": eval(xla_flags), "ynn_dots": ynn == "True",
            "async_dispatch": lines[-1] == "True"}


@glibc_only
def test_entry_point_reexecutes_once_with_the_tunables_and_the_same_arguments(tmp_path):
    r = run_program(tmp_path, {}, "--n=7", "positional")
    assert r["tunables"] == OURS
    assert r["heap_malloc"]  # set before exec, so glibc read them at start-up
    assert r["same_pid"]  # execve replaces the process: the caller's pid and pipes stay valid
    assert r["n"] == 7 and r["argv"] == "['positional']"
    assert not r["async_dispatch"]  # computations run inline: their temporaries come from the main malloc arena


@glibc_only
def test_user_tunables_are_kept_and_only_missing_ones_added(tmp_path):
    r = run_program(tmp_path, {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=5:glibc.malloc.arena_max=2"})
    parts = r["tunables"].split(":")
    assert "glibc.malloc.mmap_max=5" in parts and "glibc.malloc.arena_max=2" in parts
    assert "glibc.malloc.mmap_max=0" not in parts
    assert "glibc.malloc.hugetlb=1" in parts and f"glibc.malloc.trim_threshold={1 << 36}" in parts


@glibc_only
def test_opt_out_and_already_tuned_environments_run_unchanged(tmp_path):
    r = run_program(tmp_path, {"RESMOBILE_MALLOC": "default"})
    assert r["tunables"] is None and r["async_dispatch"]
    assert not r["heap_malloc"]  # glibc's default: a big block is a fresh mmap, page-faulted in on every use
    assert cli.malloc_tunables_env({"GLIBC_TUNABLES": OURS}) is None
    assert cli.malloc_tunables_env({cli._REEXEC_MARK: "1"}) is None  # never a second re-exec, whatever glibc did


YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_entry_point_adds_the_xla_flags_and_xla_applies_them(tmp_path):
    r = run_program(tmp_path, {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})
    assert r["xla_flags"] == f"--xla_cpu_enable_fast_math=false {YNN_FLAG}=-individual_dot"
    assert not r["ynn_dots"]  # set before JAX started its backend, so XLA compiled the dot without YNNPACK


def test_user_xla_flag_wins_and_opt_out_leaves_xla_flags_alone(tmp_path):
    r = run_program(tmp_path, {"XLA_FLAGS": f"{YNN_FLAG}=+individual_dot"})
    assert r["xla_flags"] == f"{YNN_FLAG}=+individual_dot" and r["ynn_dots"]
    r = run_program(tmp_path, {"RESMOBILE_XLA_FLAGS": "default"})
    assert r["xla_flags"] is None
    assert r["ynn_dots"]  # jaxlib's default: each dot is a YNNPACK call; the test above sees the flag change that


LIBRARY_USE = """
import os, sys
from resmobile_jax import cli
if sys.argv[1] == "late":
    import jax.numpy as jnp
    jnp.zeros(1).block_until_ready()  # the backend starts here
try:
    cli.apply_cpu_settings()
except RuntimeError as e:
    print("error:", e)
import jax, jax.numpy as jnp
a = jnp.ones((256, 256), jnp.float32)
print(repr(os.environ.get("XLA_FLAGS")), jax.config.values["jax_cpu_enable_async_dispatch"],
      "ynn_fusion" in jax.jit(lambda a: a @ a).lower(a).compile().as_text(), sep="|")
"""


@pytest.mark.parametrize("when", ["first", "late"])
def test_apply_cpu_settings_for_library_use(tmp_path, when):
    """A notebook or script without cli.run gets the entry points' XLA flag (dots off YNNPACK, as the compiled
    program shows) and inline execution, or, once JAX's backend has started, an error saying to call it first."""
    script = tmp_path / "library_use.py"
    script.write_text(LIBRARY_USE)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "RESMOBILE_XLA_FLAGS", "RESMOBILE_MALLOC")}
    out = subprocess.run([sys.executable, str(script), when], env={**env, "PYTHONPATH": ROOT}, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    flag = "--" + "=".join(next(iter(cli.XLA_CPU_FLAGS.items())))
    if when == "first":
        assert out.strip() == f"{flag!r}|False|False"
    else:
        assert "error: JAX's backend has already started" in out and "call it first" in out
        assert out.strip().endswith("None|True|True")  # nothing changed
