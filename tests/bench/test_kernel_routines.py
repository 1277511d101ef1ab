"""python -m resmobile_jax.bench.kernel_routines: the one-thread driver built against real kernel sources. It checks
that the row-reuse depthwise routines equal the generic ones bit for bit (SumRowsLine against SumLine, AddKernelRow
against AddKernelRowByTaps), and that the check and the two-version comparison do see a change in summation order."""

from pathlib import Path

import pytest

from resmobile_jax.bench import kernel_routines
from resmobile_jax.models.kernels import cpu_kernels

pytestmark = pytest.mark.slow  # each driver build compiles the whole kernel source (~20 s)

# SumRowsLine's mirrored (input-gradient) form takes its input columns last to first, so that every output sums its
# taps with j ascending, as SumLine does. Taking them first to last sums the same products in another order.
MIRROR_ORDER = "const int t = kMirror ? kCols - 1 - s : s;"
# AddRowTaps adds each tap's running sum into the accumulator every 8 outputs, as AddRowTap's blocks do; every 4
# groups the same products differently.
GRADIENT_FLUSH = "if ((q - lo[j]) % 8 == 7 || q == hi[j] - 1) {"


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernel_routines")
    source = cpu_kernels.SOURCE.read_text()
    assert MIRROR_ORDER in source and GRADIENT_FLUSH in source
    reordered = tmp / "reordered_cpu_kernels.cc"
    reordered.write_text(source.replace(MIRROR_ORDER, "const int t = s;")
                         .replace(GRADIENT_FLUSH, "if ((q - lo[j]) % 4 == 3 || q == hi[j] - 1) {"))
    return {"this": kernel_routines.build(cpu_kernels.SOURCE, tmp / "this"),
            "reordered": kernel_routines.build(reordered, tmp / "reordered")}


def test_row_reuse_routines_equal_the_generic_ones_and_runs_repeat(binaries):
    first, second = (kernel_routines.run(binaries["this"], reps=1) for _ in range(2))
    depthwise = [name for name in first if name.startswith("depthwise")]
    assert len(first) == 27 and len(depthwise) == 16
    assert all(first[name]["matches_generic"] == "yes" for name in depthwise), first
    assert all(first[name]["matches_generic"] == "-" for name in first if name not in depthwise)
    assert all(case["flop"] > 0 and case["ns"] > 0 for case in first.values())
    best = kernel_routines.best_of([first, second])  # raises if a rerun's outputs differ
    assert {name: c["hash"] for name, c in best.items()} == {name: c["hash"] for name, c in first.items()}


def test_another_summation_order_is_seen(binaries):
    this = kernel_routines.run(binaries["this"], reps=1)
    reordered = kernel_routines.run(binaries["reordered"], reps=1)
    changed = {name for name in this if name.startswith(("depthwise input grad", "depthwise kernel grad"))}
    assert len(changed) == 7
    assert all(reordered[name]["matches_generic"] == "NO" for name in changed), reordered
    assert all(reordered[name]["hash"] == this[name]["hash"] for name in this if name not in changed)

    text = kernel_routines.table(this, 100.0, reordered, "reordered")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:]}
    assert len(rows) == len(this)
    assert all(rows[name].endswith("| differ |") for name in changed)
    assert all(rows[name].endswith("| identical |") for name in this if name not in changed)


def test_a_source_that_does_not_build_is_named(tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    with pytest.raises(RuntimeError, match="broken.cc failed"):
        kernel_routines.build(broken, tmp_path / "driver")
    assert not Path(tmp_path / "driver").exists()
