"""python -m resmobile_jax.export --checkpoint RUN_OR_MODEL [--out DIR] [--formats tflite_fp32,onnx,...]

Exports a training run's best model (or a converted checkpoint) to LiteRT/TFLite (fp32, fp16, int8 dynamic range)
and ONNX, checks every export against the JAX model on the evaluation split of the checkpoint's data (max abs diff,
P@1), times each in its runtime at batch 1, and writes OUT/export.json + OUT/export.md (default OUT: CHECKPOINT/export).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections
from absl import flags

from resmobile_jax import cli

FLAGS = flags.FLAGS


def run_export(checkpoint, out: Path | None = None, formats=None, input_size=None, check_images: int = 0,
               batch_size: int = 64, config: ml_collections.ConfigDict | None = None, progress: bool = True,
               overwrite: bool = False, timing_budget_seconds: float = 5.0) -> dict:
    """The whole command as a function (compare and the tests call it). Returns the export.json record.
    `overwrite`: replace an earlier export in `out` (compare regenerates its own; the command line never does)."""
    from resmobile_jax.data.protocols import load_splits
    from resmobile_jax.data.sources import DatasetError
    from resmobile_jax.embed import model_input_hw
    from resmobile_jax.evaluate import load_checkpoint
    from resmobile_jax.export.check import FORMATS, ExportError, export_and_check, failed, format_table
    from resmobile_jax.export.onnx import missing_requirements
    from resmobile_jax.train.loop import _preprocess
    from resmobile_jax.visualize import stratified_sample

    loaded = load_checkpoint(checkpoint, config)
    out = Path(out or Path(checkpoint) / "export").absolute()
    if (out / "export.json").exists() and not overwrite:
        raise ExportError(f"{out} already holds an export (export.json); pass a new --out or delete it first")
    skipped = {}
    if formats is None:
        formats = list(FORMATS)
        if missing_requirements():
            formats.remove("onnx")
            skipped["onnx"] = missing_requirements()
    c = loaded.config
    hw = model_input_hw(loaded, input_size)
    c.model.input_size = hw[0] if hw[0] == hw[1] else list(hw)
    try:
        eval_set = load_splits(c.data, int(c.seed)).eval
    except DatasetError as e:
        raise ExportError(f"cannot load the check images: {e}") from None
    if check_images:
        eval_set = eval_set.subset(stratified_sample(eval_set.labels, check_images, int(c.seed)))
    if progress:
        print(f"exporting {loaded.source} at {hw[0]}x{hw[1]} to {', '.join(formats)}", flush=True)
    results = export_and_check(loaded.model, formats, hw, out, eval_set, _preprocess(c), batch_size, progress,
                               timing_budget_seconds)
    record = {"source": loaded.source, "variant": loaded.model.variant, "input_hw": list(hw),
              "check_images": len(eval_set), "data": c.data.dataset, "formats": results, "not_exported": skipped}
    (out / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    table = format_table(results)
    (out / "export.md").write_text(
        f"# Export of ResMobileNet {loaded.model.variant}\n\nSource: {loaded.source}\n\nCommand: `python -m "
        f"resmobile_jax.export {' '.join(sys.argv[1:])}`\n\nInput: uint8 RGB (batch, {hw[0]}, {hw[1]}, 3); output: "
        f"L2-normalized float32 embeddings. Checked on {len(eval_set)} evaluation images of {c.data.dataset}.\n\n"
        f"{table}\n" + "".join(f"\nNot exported: {k} ({v})\n" for k, v in skipped.items()))
    bad = failed(results)
    if bad:
        raise ExportError(f"{', '.join(bad)} do(es) not compute what the JAX model computes (see {out / 'export.md'}); "
                          "the files are kept for inspection, do not deploy them")
    return record


def main(argv):
    from resmobile_jax.evaluate import EvaluationError
    from resmobile_jax.export.check import format_table

    cli.start_command(argv)
    try:
        config = FLAGS.config and ml_collections.ConfigDict(FLAGS.config.to_dict())  # unlocked copy
        record = run_export(FLAGS.checkpoint, FLAGS.out, FLAGS.formats, FLAGS.input_size, FLAGS.check_images,
                            FLAGS.batch_size, config)
    except (EvaluationError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(format_table(record["formats"]))
    for fmt, reason in record["not_exported"].items():
        print(f"not exported: {fmt} ({reason})")
    out = Path(FLAGS.out or Path(FLAGS.checkpoint) / "export")
    print(f"wrote {out}/export.json, export.md and the model files")


if __name__ == "__main__":  # flags defined only when run, so importing run_export (compare, tests) defines none
    flags.DEFINE_string("checkpoint", None, "a training run's workdir or a model checkpoint (convert to-flax --out)")
    flags.DEFINE_string("out", None, "output directory (default: CHECKPOINT/export); must not hold an earlier export")
    flags.DEFINE_list("formats", None, "some of tflite_fp32, tflite_fp16, tflite_int8, onnx (default: all; onnx only "
                      "where its extras are installed)")
    flags.DEFINE_string("input_size", None, "H or HxW of the exported model (default: the checkpoint's training size)")
    flags.DEFINE_integer("check_images", 0, "evaluation images the exports are checked on (class-stratified; 0 = all)")
    flags.DEFINE_integer("batch_size", 64, "batch size of the check")
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "data to check the exports on (configs/v1.py[:preset] with "
                                    "--config.data.*); default: the run's own data, or the cpu preset for a model "
                                    "checkpoint", lock_config=False)
    flags.mark_flags_as_required(["checkpoint"])
    cli.run(main)
