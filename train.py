"""Train a ResMobileNet: python train.py --config configs/v2.py --workdir runs/v2 [--config.key=value ...]"""

import sys

from absl import flags
from ml_collections import config_flags

from resmobile_jax import cli

config_flags.DEFINE_config_file("config", None, "configs/v1.py or configs/v2.py, optionally with :PRESET", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and reports")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    from resmobile_jax.train import train_and_evaluate

    cli.start_command(argv)
    from resmobile_jax.data.idx import DatasetError
    from resmobile_jax.train.checkpoints import CheckpointWriteError
    from resmobile_jax.train.loop import NonFiniteError
    from resmobile_jax.train.validate import ConfigError

    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ConfigError, DatasetError, NonFiniteError, CheckpointWriteError) as e:  # the user's to fix: the message, not a traceback
        sys.exit(f"error: {e}")


def parse_flags(argv):
    """absl's parser, with config overrides that name no field (a typo) or the wrong type reported in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        text = text.replace("\\n", " ").replace("\\'", "").strip("'")  # ml_collections' KeyError text is a repr
        sys.exit(f"error: {' '.join(text.split())} (python train.py --helpfull lists the flags)")


if __name__ == "__main__":
    cli.run(main, flags_parser=parse_flags)
