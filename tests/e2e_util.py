"""Shared helpers of the end-to-end tests: tiny configs and reading TensorBoard events."""

import glob
import os

import tensorflow as tf

from configs import digits_l2p


def tiny_digits_config(**overrides):
  """digits_l2p shrunk to 2 tasks x 4 steps on the tiny ViT."""
  config = digits_l2p.get_config()
  config.continual.num_tasks = 2
  config.continual.num_train_steps_per_task = 4
  config.per_device_batch_size = 4
  config.log_loss_every_steps = 2
  config.checkpoint_every_steps = 2
  config.save_last_ckpt_only = False
  config.shuffle_buffer_size = 64
  config.update_from_flattened_dict(overrides)
  return config


def scalar_tags(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """All scalar summaries in `workdir`'s event files: tag -> [(step, value)]."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
        elif value.metadata.plugin_data.plugin_name == "scalars":
          number = float(tf.make_ndarray(value.tensor).reshape(-1)[0])
          out.setdefault(value.tag, []).append((event.step, number))
  return out


def all_tags(workdir: str) -> set[str]:
  """Every summary tag in `workdir`'s event files (scalars, histograms, images)."""
  return {value.tag
          for path in glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True)
          for event in tf.compat.v1.train.summary_iterator(path)
          for value in event.summary.value}
