"""Train lidiff models: ``python train.py --config=configs/celebahq_f4.py --workdir=runs/celebahq``.

Override any config field on the command line, e.g. ``--config.diffusion.train.batch_size=96``; a field that
does not exist is an error. Re-running with the same ``--workdir`` resumes from the latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from lidiff import parallel
from lidiff.checkpoint import quiet_orbax_logs
from lidiff.train import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.initialize_distributed()
    logging.set_verbosity(logging.INFO)
    quiet_orbax_logs()
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
