"""The papers' baselines, as overrides of any benchmark's config.

- Sequential fine-tuning (FT-seq, the lower bound): the whole ViT and the head are trained on
  one task after another, no prompts.
- Frozen fine-tuning (FT-seq-frozen): the same with the backbone frozen; only the head learns.
- Joint training (the upper bound): the whole ViT trained once on every class of the benchmark,
  as a single task.

All keep the benchmark's protocol: head logits masked to the current task's classes during
training (`continual.train_mask`), optimizer reset per task, evaluation after every task.
"""

# Adam's step for the whole ViT, before the global batch / 256 scaling: 1e-4 at batch 128.
FINETUNE_LEARNING_RATE = 2e-4
# The embedded digits demo's: the best of those tried for joint training there (README).
DIGITS_FINETUNE_LEARNING_RATE = 4e-3


def set_no_prompts(config):
  """A plain ViT: no prompts, the class token classifies."""
  config.method = "none"
  config.vit_classifier = "token"
  config.prompt_histogram = False
  return config


def set_ft_seq(config, learning_rate: float = FINETUNE_LEARNING_RATE):
  """Sequential fine-tuning of every parameter."""
  config = set_no_prompts(config)
  config.freeze_part = ()
  config.learning_rate = learning_rate
  return config


def set_ft_frozen(config):
  """Sequential training of the head on the frozen backbone (the prompts' learning rate)."""
  config = set_no_prompts(config)
  config.freeze_part = ("encoder", "embedding", "cls")
  return config


def set_joint(config, learning_rate: float = FINETUNE_LEARNING_RATE):
  """Every class at once, as one task, fine-tuning every parameter."""
  config = set_ft_seq(config, learning_rate)
  config.continual.num_classes_per_task *= config.continual.num_tasks
  config.continual.num_tasks = 1
  return config


def set_replay(config, per_class: int):
  """Adds a rehearsal buffer of `per_class` examples per class of each task: from task 1 on,
  every batch is joined by as many replayed examples, whose logits keep every class (the
  original's `replay_no_mask`; the new examples keep their task's mask)."""
  config.continual.replay.num_samples_per_class = per_class
  config.continual.replay_no_mask = True
  return config


def set_er(config, per_class: int, learning_rate: float = FINETUNE_LEARNING_RATE):
  """Experience replay (ER): sequential fine-tuning of every parameter with the buffer."""
  return set_replay(set_ft_seq(config, learning_rate), per_class)
