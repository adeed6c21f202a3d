"""Several hosts: per-host data shards that tile the global batch, and a 2-process run on CPU."""

import contextlib
import os
import socket

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from libml import input_pipeline
from tests import e2e_util
from tests import run_util
from tests.data_fixtures import batches
from tests.data_fixtures import pipeline_config


def _benchmarks(config, devices_per_host: int, hosts: int):
  """(one host with every device, [each of `hosts` hosts])."""
  single = input_pipeline.create_benchmark(config, num_local_devices=devices_per_host * hosts,
                                           process_index=0, process_count=1)
  shards = [input_pipeline.create_benchmark(config, num_local_devices=devices_per_host,
                                            process_index=h, process_count=hosts) for h in range(hosts)]
  return single, shards


def _assert_tiles(whole: list[dict], parts: list[list[dict]]) -> None:
  """Batch i of `whole` is batch i of every part, stacked in host order on the device axis."""
  assert all(len(p) == len(whole) for p in parts)
  for i, batch in enumerate(whole):
    for key, value in batch.items():
      np.testing.assert_array_equal(np.concatenate([p[i][key] for p in parts]), value, err_msg=f"{key} {i}")


@pytest.mark.parametrize("dataset, classes_per_task, devices_per_host, hosts, gaussian", [
    ("digits", 2, 1, 2, False),
    ("digits", 2, 2, 2, False),
    ("digits", 2, 1, 3, True),
    ("cifar100", 10, 1, 2, False),  # With random crops and flips, keyed by record.
])
def test_host_shards_tile_the_single_host_global_batches(dataset, classes_per_task, devices_per_host, hosts,
                                                          gaussian):
  config = pipeline_config(dataset, shuffle_buffer_size=16, gaussian_schedule=gaussian, **{
      "continual.num_tasks": 12 if gaussian else 3, "continual.num_classes_per_task": classes_per_task})
  mock = tfds.testing.mock_data(num_examples=120) if dataset != "digits" else contextlib.nullcontext()
  with mock:
    single, shards = _benchmarks(config, devices_per_host, hosts)
    assert len({b.num_train_steps(1) for b in shards + [single]}) == 1
    resume = single.steps_per_epoch(1) + 1 if not gaussian else 2  # Resumed within the second epoch.
    for task, start in ((0, 0), (1, resume)):
      _assert_tiles(batches(single.train_dataset(task, start_step=start)),
                    [batches(s.train_dataset(task, start_step=start)) for s in shards])
    eval_set = 0 if gaussian else 1
    _assert_tiles(batches(single.eval_dataset(eval_set)), [batches(s.eval_dataset(eval_set)) for s in shards])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
  reference_dir = str(tmp_path / "one_process")
  # The same config as the reliability test's, so that one process may share the reference run.
  config = e2e_util.tiny_digits_config(log_loss_every_steps=3)
  reference = run_util.train_in_process(config, reference_dir)["accuracy_matrix"]
  assert jax.device_count() == 2  # The reference: one process, two devices of 4 images.

  workdir = str(tmp_path / "two_processes")
  address = f"localhost:{_free_port()}"
  procs, flags = [], run_util.tiny_flags(log_loss_every_steps=3)
  for process_id in range(2):
    cmd = run_util.command(workdir, flags, f"--coordinator_address={address}", "--num_processes=2",
                           f"--process_id={process_id}")
    procs.append(run_util.start(cmd, run_util.env(1), str(tmp_path / f"process_{process_id}.log")))
  try:
    statuses = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
      p.wait()
  outputs = [p.output()[0] for p in procs]
  for status, out in zip(statuses, outputs):
    assert status == 0, out[-3000:]
  assert "Accuracy matrix" in outputs[0] and "Accuracy matrix" not in outputs[1]

  np.testing.assert_array_equal(run_util.results_matrix(workdir), reference)
  got, want = run_util.read_checkpoints(workdir), run_util.read_checkpoints(reference_dir)
  assert sorted(got) == sorted(want)
  got_leaves, want_leaves = (dict(jax.tree_util.tree_leaves_with_path(c[max(c)][1])) for c in (got, want))
  for path, leaf in want_leaves.items():
    np.testing.assert_array_equal(got_leaves[path], leaf, err_msg=jax.tree_util.keystr(path))
  # Summaries come from process 0 alone: one event file, each point once.
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  assert len(events) == 1
  got_curves, want_curves = e2e_util.scalar_tags(workdir), e2e_util.scalar_tags(reference_dir)
  for tag in ("loss", "train_accuracy", "accuracy_0", "accuracy_1", "avg_acc"):
    assert got_curves[tag] == want_curves[tag], tag
