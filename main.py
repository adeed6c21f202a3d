"""Command line entry point: flags in, `train_continual.train_and_evaluate(config, workdir)` out.

  python main.py --my_config configs/cifar100_l2p.py --workdir=./l2p \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Running the same command again resumes the run in --workdir; --restart moves it aside and
starts over. On several hosts, run the same command on every host, with --multihost (TPU pods,
SLURM, ...) or with --coordinator_address, --num_processes and --process_id. Bad input ends
in one line `error: ...` and exit status 2 before anything is written.

All logic lives in importable, tested modules (`train_continual`, `libml`, `models`).
"""

import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from libml import interrupts

# Read by TensorFlow and XLA when first imported (in main(), after these lines); a user's own
# setting wins. Level 1 keeps their C++ INFO notices out of the log (absl's "before
# absl::InitializeLog()" line, CPU features), warnings and errors in. The oneDNN notice (where
# TensorFlow turns oneDNN on: newer x86 CPUs) shows at any level; it goes with oneDNN.
# TensorFlow only runs tf.data here, whose batches are the same with and without oneDNN.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

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


# ml_collections' message for a field that a locked ConfigDict does not have.
_NOT_A_FIELD = re.compile(r'Key "([^"]+)" does not exist and cannot be added since the config is locked')


def _config_path(argv) -> str | None:
  """The config file that --my_config in `argv` names (without its `:arg`), if given."""
  for i, arg in enumerate(argv):
    if arg.startswith("--my_config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--my_config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _chain(e: BaseException | None):
  """`e`, then the exceptions it was raised from or while handling (config_flags wraps some)."""
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def _config_file_error(e: BaseException, path: str | None) -> str | None:
  """One line naming the config file, the line and the error, if `e` came from running it."""
  if path is None:
    return None
  real = os.path.realpath(path)
  if isinstance(e, SyntaxError) and e.filename and os.path.realpath(e.filename) == real:
    return f"Config file {path}, line {e.lineno}: SyntaxError: {e.msg}."
  for cause in _chain(e):
    line = next((frame.lineno for frame in reversed(traceback.extract_tb(cause.__traceback__))
                 if os.path.realpath(frame.filename) == real), None)
    if line is None:
      continue
    where, text = f"Config file {path}, line {line}", " ".join(str(cause).split()).rstrip(".")
    field = _NOT_A_FIELD.search(text)
    if field:  # The base config is locked: a misspelt field name.
      return f"{where}: {field.group(1)!r} is not a config field (configs/common.py defines them all); check the spelling."
    return f"{where}: {type(cause).__name__}: {text}."
  if isinstance(e, AttributeError) and "get_config" in str(e):
    return f"Config file {path} defines no get_config(); a config file returns its ConfigDict from get_config()."
  return None


def _parse_flags(argv):
  """absl's parser, but a bad config file, flag or override ends in one line, not a trace."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    message = _config_file_error(e, _config_path(argv))
    if message is None and isinstance(e, (AttributeError, KeyError)):
      override = next((a for a in argv if a.startswith("--my_config.")), "--my_config.<field>")
      hint = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("\"'").split())
      message = (f"Unknown config field in {override.split('=')[0]} ({hint}): check the spelling "
                 "against the config file.")
    elif message is None:
      known = isinstance(e, (flags.Error, ValueError, TypeError, OSError))
      message = " ".join(str(e).split()) if known else f"{type(e).__name__}: {' '.join(str(e).split())}"
    _fail(message)


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
  """Keeps libraries' INFO lines out of the run log (their warnings still show).

  Orbax's per-save lines, clu's progress notes (the per-task progress line has them) and JAX's
  probe of the backends that are not installed ("Unable to initialize backend 'tpu'"); JAX
  still warns of a GPU or TPU that it cannot use.
  """
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= py_logging.WARNING or not any(
          path in r.pathname for path in ("/orbax/", "/clu/platform/")))
  py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)


def main(argv):
  # From here on Ctrl-C and SIGTERM stop the run at the next step, checkpointed.
  stop = interrupts.StopRequest().install()
  _quiet_library_logs()
  if len(argv) > 1:
    _fail(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
  if FLAGS.my_config is None or FLAGS.workdir is None:
    _fail("Both --my_config=configs/<name>.py and --workdir=<dir> are required.")
  try:
    config = FLAGS.my_config
    # A config file that failed to load raises at the first use of its config.
    config.model_name  # pylint: disable=pointless-statement
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
    results = train_continual.train_and_evaluate(config, FLAGS.workdir, restart=FLAGS.restart, stop=stop)
  except UserError as e:
    if FLAGS.traceback:
      traceback.print_exc()
    _fail(str(e))
  except interrupts.Stopped as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
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
