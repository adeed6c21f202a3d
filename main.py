"""Command line entry point: flags in, `train_continual.train_and_evaluate(config, workdir)` out.

  python main.py --my_config configs/cifar100_l2p.py --workdir=./l2p \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Running the same command again resumes the run in --workdir; --restart moves it aside and
starts over. On several hosts, run the same command on every host, with --multihost (TPU pods,
SLURM, ...) or with --coordinator_address, --num_processes and --process_id. Bad input ends
in one line `error: ...` and exit status 2 before anything is written.

All logic lives in importable, tested modules (`train_continual`, `libml`, `models`).
"""

import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("my_config", None, "Config file (configs/*.py); override fields with "
                                "--my_config.<field>=<value>.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard summaries and results.json.")
flags.DEFINE_bool("traceback", False, "Show the full traceback of a usage error instead of one line.")
flags.DEFINE_bool("restart", False, "Start over in a --workdir that holds a run: the earlier run is moved "
                  "to <workdir>.old (then .old-2, ...), never deleted.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.DEFINE_bool("multihost", False, "Multi-host with the cluster's own environment (TPU pod, SLURM, ...).")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl's parser, but a bad flag or config override ends in one line, not a usage dump."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    override = next((a for a in argv if a.startswith("--my_config.")), "--my_config.<field>")
    hint = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("\"'").split())
    _fail(f"Unknown config field in {override.split('=')[0]} ({hint}): check the spelling against the "
          "config file.")
  except (flags.Error, ValueError, TypeError, OSError) as e:
    _fail(" ".join(str(e).split()))


def _initialize_distributed(jax) -> None:
  """Joins the processes of a multi-host run (before any other use of jax)."""
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      _fail("Give all of --coordinator_address, --num_processes and --process_id, or none "
            "(--multihost reads them from the cluster's environment).")
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
      _fail(f"--process_id={FLAGS.process_id} must be in [0, --num_processes={FLAGS.num_processes}).")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.multihost:
    jax.distributed.initialize()


def _hide_accelerators_from_tensorflow() -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass


def _quiet_library_logs() -> None:
  """Keeps orbax's per-save INFO lines out of the run log (warnings still show)."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= py_logging.WARNING or "/orbax/" not in r.pathname)


def main(argv):
  _quiet_library_logs()
  if len(argv) > 1:
    _fail(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
  if FLAGS.my_config is None or FLAGS.workdir is None:
    _fail("Both --my_config=configs/<name>.py and --workdir=<dir> are required.")
  try:
    config = FLAGS.my_config
    config.get("model_name")  # A config file that failed to load raises here.
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"Cannot load config file {flags.FLAGS['my_config'].config_filename}: {' '.join(str(e).split())}")
  import jax  # pylint: disable=g-import-not-at-top
  from libml.errors import UserError  # pylint: disable=g-import-not-at-top
  _initialize_distributed(jax)
  _hide_accelerators_from_tensorflow()
  logging.info("JAX process %d / %d, local devices: %s, global devices: %d", jax.process_index(),
               jax.process_count(), jax.local_devices(), jax.device_count())
  import train_continual  # pylint: disable=g-import-not-at-top
  try:
    results = train_continual.train_and_evaluate(config, FLAGS.workdir, restart=FLAGS.restart)
  except UserError as e:
    if FLAGS.traceback:
      traceback.print_exc()
    _fail(str(e))
  if jax.process_index() == 0:
    _print_summary(results, FLAGS.workdir)


def _print_summary(results, workdir) -> None:
  from libml import reporting  # pylint: disable=g-import-not-at-top
  print("\nAccuracy matrix (%, rows: task evaluated, columns: after training task):")
  print(reporting.format_matrix(results["accuracy_matrix"]))
  for key in ("avg_acc", "forgetting", "backward", "learning_acc"):
    if key in results:
      print(f"{key + ' (%)':>17}: {results[key]:.2f}")
  print(f"\nResults: {workdir}/results.json\nCurves:  tensorboard --logdir {workdir}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
