"""Inference timing: compile separated from run time, statistics consistent, repeats bounded."""

from pathlib import Path

import jax.numpy as jnp

from resmobile_jax.models import build_model
from resmobile_jax.timing import cpu_model, inference_timing, time_jitted


def test_time_jitted_statistics_are_ordered_and_bounded():
    r = time_jitted(lambda x: jnp.sin(x) @ x.T, jnp.ones((64, 64)), min_repeats=7, max_repeats=9, budget_seconds=0.0)
    assert r["repeats"] == 7  # the budget is spent, but never fewer than min_repeats
    assert r["compile_seconds"] > 0
    assert 0 < r["min_ms"] <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]


def test_inference_timing_of_a_model():
    model = build_model({"variant": "v1", "embedding_dim": 32})
    t = inference_timing(model, (32, 32), (1, 4), min_repeats=3, max_repeats=3)
    assert t["input_hw"] == [32, 32] and t["backend"] == "cpu" and "cores" in t["device"]
    for b in (1, 4):
        r = t[f"batch_{b}"]
        assert r["ms_per_image"] * b == r["median_ms"]
        assert abs(r["images_per_second"] - 1e3 * b / r["median_ms"]) < 1e-6


def test_cpu_model_names_family_and_model_where_the_vm_shows_only_a_brand():
    info = (Path(__file__).parent / "fixtures" / "cpuinfo_epyc_zen4.txt").read_text()  # a real 2-core Zen 4 VM's
    assert cpu_model(info) == "AMD EPYC (AuthenticAMD family 25 model 17)"
    assert cpu_model(info + "\n" + info.replace("cpu family\t: 25", "cpu family\t: 26")) == cpu_model(info)  # CPU 0
    assert cpu_model("") == "unknown CPU"
