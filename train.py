"""Train lidiff models: ``python train.py --config=configs/celebahq_f4.py --workdir=runs/celebahq``.

Override any config field on the command line, e.g. ``--config.diffusion.train.batch_size=96``; a field that
does not exist is an error. Re-running with the same ``--workdir`` resumes from the latest checkpoint.
"""

import difflib
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from lidiff import cli, parallel
from lidiff.train import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def _config_file(argv: list[str]) -> str | None:
    """The value of ``--config`` (``--config=x`` or ``--config x``) in ``argv``."""
    for i, arg in enumerate(argv):
        m = re.match(r"^--?config(=(.*))?$", arg)
        if m:
            return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def unknown_overrides(argv: list[str]) -> list[str]:
    """One line per ``--config.<path>`` in ``argv`` that names no field of the config file, with the fields
    that do exist at that level (ml_collections itself only says ``AttributeError: "'<name>'"``)."""
    path = _config_file(argv)
    if path is None:
        return []
    config = flags.FLAGS["config"].parser.parse(path)
    problems = []
    for arg in argv:
        m = re.match(r"^--?config\.([^=]+)", arg)
        if not m:
            continue
        flag, node, parts = f"--config.{m.group(1)}", config, m.group(1).split(".")
        for i, part in enumerate(parts):
            where = ".".join(["config", *parts[:i]])
            if not isinstance(node, ConfigDict):
                problems.append(f"{flag}: {where} is a value of type {type(node).__name__}, not a section")
                break
            if part not in node:
                fields = sorted(node.keys())
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{flag}: {where} has no field {part!r}{hint}; its fields are {', '.join(fields)}")
                break
            node = node[part]
    return problems


def missing_config_file(argv: list[str]) -> str | None:
    """A message when ``--config`` names a file that does not exist (``path[:variant]``), else None."""
    path = _config_file(argv)
    if path is None:
        return None
    path = path.split(":", 1)[0]
    if os.path.isfile(path):
        return None
    configs = sorted(f for f in os.listdir("configs") if f.endswith(".py")) if os.path.isdir("configs") else []
    close = difflib.get_close_matches(os.path.basename(path), configs, n=1)
    hint = f" (did you mean configs/{close[0]}?)" if close else ""
    return f"--config={path}: no such config file{hint}. The shipped experiments are in configs/."


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that a missing ``--config`` file and a ``--config.<path>`` naming no config
    field are reported by name, without a traceback."""
    missing = missing_config_file(argv)
    if missing:
        cli.exit_with_message(missing)
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        problems = unknown_overrides(argv)
        if not problems:
            raise
        sys.stderr.write("FATAL Flags parsing error: unknown config field\n  " + "\n  ".join(problems) + "\n")
        sys.exit(1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.initialize_distributed()
    parallel.check_same_config(flags.FLAGS.config.to_json())
    if jax.process_index() > 0:  # one console: process 0 logs progress, the others only warnings and errors
        logging.set_verbosity(logging.WARNING)
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main, flags_parser=parse_flags)
