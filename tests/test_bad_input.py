"""Bad input: one line, a non-zero exit, and nothing in the workdir lost or overwritten."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver

import train_continual
from libml import steps
from libml import validation
from libml.errors import UserError
from tests import ckpt_fixtures
from tests import e2e_util
from tests import run_util

_DIVERGES_AFTER = 3  # Global train step whose update makes every parameter NaN.


def _one_line_error(config, workdir: str, match: str, **kwargs) -> str:
  with pytest.raises(UserError, match=match) as error:
    train_continual.train_and_evaluate(config, workdir, **kwargs)
  message = str(error.value)
  assert message and "\n" not in message
  return message


def _make_training_diverge(monkeypatch) -> None:
  """Makes the train step's update at global step `_DIVERGES_AFTER` turn every parameter NaN."""
  original = steps.train_step

  def train_step(state, *args, **kwargs):
    new_state, metrics = original(state, *args, **kwargs)
    blown = new_state.step >= _DIVERGES_AFTER
    params = jax.tree.map(lambda p: jnp.where(blown, jnp.nan, p), new_state.params)
    return new_state.replace(params=params), metrics
  monkeypatch.setattr(steps, "train_step", train_step)


@pytest.fixture
def diverging_steps(monkeypatch):
  _make_training_diverge(monkeypatch)


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
  """A workdir holding a real (diverged) run: checkpoints, summaries, config.json."""
  workdir = str(tmp_path_factory.mktemp("previous") / "run")
  config = e2e_util.tiny_digits_config(checkpoint_every_steps=2, log_loss_every_steps=1)
  with pytest.MonkeyPatch.context() as monkeypatch:
    _make_training_diverge(monkeypatch)
    with pytest.raises(UserError) as error:
      train_continual.train_and_evaluate(config, workdir)
  return workdir, config, str(error.value)


def test_nan_loss_stops_naming_task_and_step_and_keeps_the_last_good_checkpoint(previous_run):
  workdir, _, message = previous_run
  # The update of step 3 broke the parameters; step 4's loss is the first non-finite one.
  assert message == ("Training diverged: the loss is nan in task 0 at step 4; stopped before checkpointing "
                     "it, the last checkpoint (task 0, step 2) is kept; lower learning_rate and start again "
                     "with --restart or another --workdir.")
  checkpoints = run_util.read_checkpoints(workdir)
  assert [c[0]["task_step"] for c in checkpoints.values()] == [2]
  for progress, state in checkpoints.values():
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state)), progress
  assert [s for s, _ in e2e_util.scalar_tags(workdir)["loss"]] == [1, 2, 3]


def test_non_finite_parameters_are_never_checkpointed(tmp_path, diverging_steps):
  del diverging_steps
  config = e2e_util.tiny_digits_config(checkpoint_every_steps=1, log_loss_every_steps=4)
  message = _one_line_error(
      config, str(tmp_path / "run"), r"state\.params\[.*\] is not finite in task 0 at step 3; stopped before "
      r"checkpointing it, the last checkpoint \(task 0, step 2\)")
  assert message.startswith("Training diverged: ")
  assert [c[0]["task_step"] for c in run_util.read_checkpoints(str(tmp_path / "run")).values()] == [1, 2]


def _write_checkpoint(path: str, **dims) -> str:
  """A ViT-test-shaped (unless `dims` say otherwise) release `.npz` at `path`."""
  params = ckpt_fixtures.make_vit_params(**{"hidden": 32, "num_heads": 2, "mlp_dim": 64, "patch": 8,
                                            "num_layers": 6, "grid": 2, **dims})
  ckpt_fixtures.write_npz(path, params)
  return path


def _truncated(path: str) -> str:
  _write_checkpoint(path)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def _garbage(path: str) -> str:
  with open(path, "wb") as f:
    f.write(b"<html>403 Forbidden</html>")
  return path


# (config overrides, or a function of a scratch directory giving them; expected message).
_BAD_CONFIGS = {
    "missing_checkpoint": (lambda d: {"init_checkpoint": os.path.join(d, "ViT-B_16.npz")},
                           r"init_checkpoint '.*ViT-B_16\.npz' does not exist"),
    "corrupt_checkpoint": (lambda d: {"init_checkpoint": _garbage(os.path.join(d, "ViT-B_16.npz"))},
                           r"is neither a \.npz \(zip\) nor a \.safetensors file"),
    "truncated_checkpoint": (lambda d: {"init_checkpoint": _truncated(os.path.join(d, "ViT-B_16.npz"))},
                             r"is a truncated or corrupt \.npz file \(BadZipFile"),
    "checkpoint_of_another_size": (
        lambda d: {"init_checkpoint": _write_checkpoint(os.path.join(d, "big.npz"), hidden=48, mlp_dim=96)},
        r"does not fit model_name 'ViT-test'"),
    "unknown_model_name": ({"model_name": "ViT-Q_16"},
                           r"Unknown model_name 'ViT-Q_16'; valid names: ViT-Ti_16, .*ViT-B_16, .*ViT-test"),
    "top_k_above_pool_size": ({"prompt_pool_param.top_k": 11, "prompt_pool_param.pool_size": 10},
                              r"top_k=11 must be in \[1, pool_size=10\]"),
    "warmup_as_long_as_training": ({"warmup_epochs": 3, "num_epochs": 3},
                                   r"warmup_epochs=3 must be in \[0, num_epochs=3\)"),
    "negative_learning_rate": ({"learning_rate": -0.1},
                               r"learning_rate=-0.1 must be a positive, finite number"),
    "nan_learning_rate": ({"learning_rate": float("nan")},
                          r"learning_rate=nan must be a positive, finite number"),
    "prompt_layer_outside_depth": ({"e_prompt_layer_idx": (0, 6)},
                                   r"e_prompt_layer_idx=\[0, 6\] must be distinct block indices in \[0, 6\)"),
    "vote_groups_do_not_tile": ({"prompt_pool_param.vote_group_size": 3},
                                r"vote_group_size=3 does not divide per_device_batch_size=4"),
    "empty_batch": ({"per_device_batch_size": 0}, r"per_device_batch_size=0 must be a positive integer"),
    "subsample_rate_above_one": ({"subsample_rate": 2.0}, r"subsample_rate=2\.0 must be -1 \(all\) or in \(0, 1\]"),
    "dataset_not_prepared": (lambda d: {"dataset": "cifar100", "data_dir": d},
                             r"'cifar100'.* not prepared"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CONFIGS))
def test_bad_config_is_one_line_before_anything_is_written(tmp_path, case):
  overrides, match = _BAD_CONFIGS[case]
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  overrides = overrides(str(scratch)) if callable(overrides) else overrides
  workdir = str(tmp_path / "run")
  _one_line_error(e2e_util.tiny_digits_config(**overrides), workdir, match)
  assert not os.path.exists(workdir)


def test_config_error_leaves_an_existing_run_untouched(tmp_path, previous_run):
  workdir = str(tmp_path / "run")
  shutil.copytree(previous_run[0], workdir)
  before = e2e_util.snapshot(workdir)
  config = e2e_util.tiny_digits_config(**{"prompt_pool_param.top_k": 11, "prompt_pool_param.pool_size": 10})
  _one_line_error(config, workdir, "top_k=11")
  assert e2e_util.snapshot(workdir) == before


def test_workdir_of_another_config_is_refused_unless_restart(tmp_path, previous_run):
  workdir = str(tmp_path / "run")
  shutil.copytree(previous_run[0], workdir)
  before = e2e_util.snapshot(workdir)
  stored = previous_run[1]
  config = e2e_util.tiny_digits_config(learning_rate=stored.learning_rate * 2, **{
      "prompt_pool_param.length": stored.prompt_pool_param.length + 1})
  diff = (f"learning_rate: {stored.learning_rate} -> {config.learning_rate}; prompt_pool_param.length: "
          f"{stored.prompt_pool_param.length} -> {config.prompt_pool_param.length}")
  message = _one_line_error(config, workdir, "holds a run of a different config")
  assert message == (f"workdir {workdir!r} holds a run of a different config ({diff}); pass --restart to "
                     "move that run aside and start over, or choose another --workdir.")
  assert e2e_util.snapshot(workdir) == before
  # --restart moves the whole earlier run aside, byte for byte, and starts a new one.
  validation.claim_workdir(workdir, config, restart=True)
  assert e2e_util.snapshot(workdir + ".old") == before
  with open(os.path.join(workdir, validation.CONFIG_FILE)) as f:
    assert json.load(f) == validation.config_json(config)
  assert os.listdir(workdir) == [validation.CONFIG_FILE]
  validation.claim_workdir(workdir, e2e_util.tiny_digits_config(), restart=True)
  assert os.listdir(workdir + ".old-2") == [validation.CONFIG_FILE]


def test_harmless_changes_resume_and_a_run_without_config_is_refused(tmp_path):
  config = e2e_util.tiny_digits_config(init_checkpoint="/data/a/ViT-B_16.npz")
  workdir = str(tmp_path / "run")
  validation.claim_workdir(workdir, config, restart=False)
  moved = e2e_util.tiny_digits_config(init_checkpoint="/mnt/b/ViT-B_16.npz", data_dir="/mnt/tfds",
                                      log_loss_every_steps=7, checkpoint_every_steps=9)
  validation.check_workdir(workdir, moved, restart=False)
  other = e2e_util.tiny_digits_config(init_checkpoint="/data/a/ViT-B_32.npz")
  with pytest.raises(UserError, match=r"init_checkpoint: \"ViT-B_16\.npz\" -> \"ViT-B_32\.npz\""):
    validation.check_workdir(workdir, other, restart=False)
  os.remove(os.path.join(workdir, validation.CONFIG_FILE))
  os.mkdir(os.path.join(workdir, "checkpoints"))
  with pytest.raises(UserError, match="holds a run without config.json"):
    validation.check_workdir(workdir, config, restart=False)


def test_workdir_that_cannot_be_written_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  _one_line_error(e2e_util.tiny_digits_config(), str(blocker / "run"), r"workdir '.*' cannot be created")
  _one_line_error(e2e_util.tiny_digits_config(), str(blocker), r"workdir '.*' is a file, not a directory")
  assert blocker.read_text() == "not a directory"
  if os.geteuid() != 0:  # Permissions do not bind root.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _one_line_error(e2e_util.tiny_digits_config(), str(locked), r"workdir '.*' is not writable")


def _cli(tmp_path, *flags: str):
  cmd = run_util.command(str(tmp_path / "run"), {}, *flags)
  return run_util.run(cmd, run_util.env(2), timeout=120)


def test_unknown_config_key_is_one_line_with_exit_status_2(tmp_path):
  done = _cli(tmp_path, "--my_config.prompt_pool_param.pool_sise=20")
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [done.stderr.strip()]
  assert done.stderr.startswith("error: Unknown config field in --my_config.prompt_pool_param.pool_sise")
  assert not os.path.exists(tmp_path / "run")


def _main_in_process(capsys, config, workdir: str, **flag_values) -> tuple[int, str]:
  """main.py's main() with `config` and flags in this process: (exit status, stderr)."""
  import main  # pylint: disable=g-import-not-at-top  (defines main.py's flags)
  if not main.FLAGS.is_parsed():
    main.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(workdir=workdir, **flag_values):
    main.FLAGS["my_config"].value = config
    with pytest.raises(SystemExit) as exited:
      main.main(["main.py"])
  return exited.value.code, capsys.readouterr().err


def test_user_errors_print_one_line_and_a_traceback_only_when_asked(tmp_path, capsys):
  config = e2e_util.tiny_digits_config(**{"prompt_pool_param.top_k": 11, "prompt_pool_param.pool_size": 10})
  workdir = str(tmp_path / "run")
  status, plain = _main_in_process(capsys, config, workdir)
  assert status == 2
  assert plain.strip().splitlines() == [
      "error: top_k=11 must be in [1, pool_size=10]; lower top_k or enlarge the pool."]
  status, verbose = _main_in_process(capsys, config, workdir, traceback=True)
  assert status == 2 and "Traceback" in verbose
  assert verbose.strip().splitlines()[-1] == plain.strip()
  assert not os.path.exists(workdir)


def test_incomplete_multihost_flags_are_one_line(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  status, err = _main_in_process(capsys, e2e_util.tiny_digits_config(), workdir, num_processes=2)
  assert status == 2
  assert err.strip().splitlines() == ["error: Give all of --coordinator_address, --num_processes and "
                                      "--process_id, or none (--multihost reads them from the cluster's "
                                      "environment)."]
  status, err = _main_in_process(capsys, e2e_util.tiny_digits_config(), workdir, num_processes=2,
                                 process_id=2, coordinator_address="localhost:1234")
  assert status == 2 and err.strip() == "error: --process_id=2 must be in [0, --num_processes=2)."
  assert not os.path.exists(workdir)


_BROKEN_CONFIG_FILES = {
    "syntax_error": ("def get_config(:\n  pass\n", r"line 1: SyntaxError: invalid syntax\.$"),
    "name_error": ("import ml_collections\n\n\ndef get_config():\n  config = ml_collections.ConfigDict()\n"
                   "  config.model_name = undefined_name\n  return config\n",
                   r"line 6: NameError: name 'undefined_name' is not defined\.$"),
    "no_get_config": ("MODEL = 'ViT-B_16'\n", r" defines no get_config\(\); "),
    # The base config is locked: a field it does not define is a typo, not a new field.
    "misspelt_field": ("from configs import digits_l2p\n\n\ndef get_config():\n"
                       "  config = digits_l2p.get_config('tiny')\n  config.leraning_rate = 1.0\n  return config\n",
                       r"line 6: 'leraning_rate' is not a config field \(configs/common\.py defines them all\); "
                       r"check the spelling\.$"),
}


@pytest.mark.parametrize("case", sorted(_BROKEN_CONFIG_FILES))
def test_config_file_that_does_not_load_is_one_line_naming_file_and_line(tmp_path, case):
  text, match = _BROKEN_CONFIG_FILES[case]
  path = tmp_path / f"{case}.py"
  path.write_text(text)
  done = run_util.run(run_util.command(str(tmp_path / "run"), {}, config=str(path)), run_util.env(1),
                      timeout=120)
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.strip().splitlines() == [done.stderr.strip()]
  assert done.stderr.startswith(f"error: Config file {path}")
  assert re.search(match, done.stderr.strip()), done.stderr
  assert not os.path.exists(tmp_path / "run")


def test_unknown_config_argument_is_one_line_naming_the_valid_ones(tmp_path):
  path = os.path.join(run_util.ROOT, "configs", "digits_l2p.py")
  done = run_util.run(run_util.command(str(tmp_path / "run"), {}, config=f"{path}:huge"), run_util.env(1),
                      timeout=120)
  assert done.returncode == 2, done.stderr[-2000:]
  assert re.fullmatch(rf"error: Config file {re.escape(path)}, line \d+: ValueError: Unknown config argument "
                      r"'huge'; valid: tiny \(or none for the full run\)\.", done.stderr.strip()), done.stderr
  assert not os.path.exists(tmp_path / "run")
