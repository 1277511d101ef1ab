"""The comparison's statistics and verdicts on hand-worked numbers, and the whole command end to end (slow)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from resmobile_jax.compare import difference_verdict, mean_std, recommendation


def test_mean_std_uses_the_sample_standard_deviation():
    assert mean_std([0.8]) == (0.8, 0.0)
    m, s = mean_std([0.80, 0.82, 0.84])
    assert m == pytest.approx(0.82) and s == pytest.approx(0.02)


def test_difference_verdict_hand_worked():
    # d = 0.10; variances 0.0002 each, n = 2: se = sqrt(0.0001 + 0.0001) = 0.014142; 2 se = 0.0283 < 0.10
    assert difference_verdict([0.80, 0.82], [0.90, 0.92]) == "+0.1000 ± 0.0283 (2 s.e.; beyond noise)"
    # d = 0.01; variances 0.0008 each: se = 0.028284, 2 se = 0.0566 > 0.01
    assert difference_verdict([0.80, 0.84], [0.81, 0.85]) == "+0.0100 ± 0.0566 (2 s.e.; within noise)"
    assert "noise not measured" in difference_verdict([0.8], [0.9])


def _profiles(macs1=100, macs2=150):
    return [{"total": {"macs": macs1, "params": 1000}}, {"total": {"macs": macs2, "params": 1010}}]


def _timings(ms1=10.0, ms2=12.0):
    return [{"large": {"input_hw": [224, 224], "batch_1": {"median_ms": ms}}} for ms in (ms1, ms2)]


def _runs(p1, p2, m1, m2):
    return [[{"precision_at_1": p, "map": m} for p, m in zip(p1, m1)], [{"precision_at_1": p, "map": m} for p, m in zip(p2, m2)]]


def test_recommendation_follows_the_numbers():
    v2_better = recommendation(_runs([0.80, 0.81], [0.90, 0.91], [0.6, 0.61], [0.7, 0.71]), _profiles(), _timings())
    assert "V2 retrieves better" in v2_better and "+50% MACs" in v2_better and "+20% batch-1 latency" in v2_better
    v1_better = recommendation(_runs([0.90], [0.80], [0.7], [0.6]), _profiles(), _timings())
    assert "keep V1" in v1_better and "--seeds 3" in v1_better
    noise = recommendation(_runs([0.80, 0.84], [0.81, 0.85], [0.60, 0.64], [0.61, 0.65]), _profiles(), _timings())
    assert "within seed-to-seed noise" in noise and "--seeds" not in noise
    mixed = recommendation(_runs([0.80, 0.801], [0.85, 0.851], [0.70, 0.701], [0.60, 0.601]), _profiles(), _timings())
    assert "disagree" in mixed


@pytest.mark.slow
def test_compare_command_end_to_end_with_two_seeds(tmp_path, capsys):
    """Tiny runs (3 steps, 200 eval images): 2 seeds x 2 variants trained, report + PNGs written; finished runs reused."""
    cmd = [sys.executable, "-m", "resmobile_jax.compare", "--workdir", str(tmp_path), "--seeds", "2",
           "--tsne_points", "100", "--timing_size", "64", "--export_formats", "tflite_fp32,tflite_int8",
           "--export_check_images", "40",
           "--set", "train.num_steps=3", "--set", "optimizer.warmup_steps=1", "--set", "data.batch_size=32",
           "--set", "data.p=4", "--set", "data.k=8", "--set", "data.max_eval_images=200",
           "--set", "train.precise_bn_images=128", "--set", "train.progress=False"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    for run in ("v1", "v2", "v1_seed1", "v2_seed1"):
        assert json.loads((tmp_path / run / "final_metrics.json").read_text())["step"] == 3
    assert json.loads((tmp_path / "v1_seed1" / "run.json").read_text())["config"]["seed"] == 1
    report = (tmp_path / "report.md").read_text()
    assert "2 seeds (0..1), mean ± std" in report and "2 s.e.;" in report
    data = json.loads((tmp_path / "report.json").read_text())
    p1 = [r["precision_at_1"] for r in data["v1"]["runs"]]
    assert f"| P@1 | {np.mean(p1):.4f} ± {np.std(p1, ddof=1):.4f} |" in report
    r = data["v2"]["export"][0]["formats"]["tflite_int8"]  # exported at the training size, checked on 40 eval images
    assert (tmp_path / "export_v2" / r["file"]).is_file() and r["check_images"] == 40
    assert "| export tflite_int8 (LiteRT), 32 px: size, P@1 on 40 eval images, max abs diff vs JAX, batch-1 latency | " in report
    assert "| edge latency, tflite_int8 (LiteRT), batch 1, 64 px: ms median (p10-p90) | " in report
    fp32 = data["v1"]["export"][0]["formats"]["tflite_fp32"]  # int8: judged by P@1, not here
    assert fp32["max_abs_diff"] <= fp32["tolerance"] <= 1e-3
    assert data["v1"]["export"][1]["input_hw"] == [64, 64]
    assert "| Mobile-friendly (measured on this CPU) | int8 LiteRT: " in report
    for png in ("tsne_v1_v2.png", "tsne_v1.png", "tsne_v2.png", "retrieval_v1.png", "retrieval_v2.png"):
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG"
    # A rerun reuses finished runs whose recorded config equals the new one (checked in-process: a whole second
    # compare would repeat the minutes of pictures and timing).
    import ml_collections

    from resmobile_jax.compare import run_or_reuse

    for run in ("v1", "v2_seed1"):
        recorded = json.loads((tmp_path / run / "run.json").read_text())["config"]
        result = run_or_reuse(ml_collections.ConfigDict(recorded), tmp_path / run)
        assert result["step"] == 3
    assert capsys.readouterr().out.count("reusing the finished run") == 2
