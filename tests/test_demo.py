"""The embedded demo: glyph rendering, the shipped pretrained ViT, the baselines comparison."""

import json
import os
import string
import sys

from flax import traverse_util
import jax
import numpy as np
import pytest

from configs import digits_l2p
from demo import compare
from demo import glyphs
from demo import pretrain_vit
from libml import pretrained
from models import factory
from tests import run_util


def test_glyph_images_look_like_the_digits_and_are_seeded():
  bank = glyphs.draw_glyphs()
  assert len(bank) == len(glyphs.FONTS) * len(glyphs.CHARACTERS)
  images, labels = glyphs.make_dataset(bank, 300, seed=3)
  assert images.dtype == np.uint8 and images.shape == (300, 8, 8)
  # Counts of 4x4 blocks of a binary bitmap, as scikit-learn's digits.
  assert images.min() == 0 and images.max() == 16
  assert labels.min() >= 0 and labels.max() < len(glyphs.CHARACTERS)
  again, again_labels = glyphs.make_dataset(bank, 300, seed=3)
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(labels, again_labels)
  other, _ = glyphs.make_dataset(bank, 300, seed=4)
  assert not np.array_equal(images, other)
  # Two renders of one glyph differ (random affine, threshold, noise).
  rng = np.random.default_rng(0)
  assert not np.array_equal(glyphs.render(bank[0], rng), glyphs.render(bank[0], rng))


def test_glyph_classes_are_disjoint_from_the_digits():
  assert not set(string.digits) & set(glyphs.CHARACTERS)
  assert len(set(glyphs.CHARACTERS)) == len(glyphs.CHARACTERS)


def _shipped():
  with np.load(digits_l2p.DEMO_CHECKPOINT) as f:
    return {k: f[k] for k in f.files}


def test_shipped_checkpoint_is_a_release_npz_of_vit_demo():
  flat = _shipped()
  assert os.path.getsize(digits_l2p.DEMO_CHECKPOINT) < 4 * 2**20
  assert flat["embedding/kernel"].shape == (4, 4, 3, 64)
  assert flat["cls"].shape == (1, 1, 64)
  assert flat["Transformer/posembed_input/pos_embedding"].shape == (1, 17, 64)
  assert flat["Transformer/encoderblock_5/MultiHeadDotProductAttention_1/query/kernel"].shape == (64, 4, 16)
  assert "Transformer/encoderblock_6/LayerNorm_0/scale" not in flat
  assert flat["head/kernel"].shape == (64, len(glyphs.CHARACTERS))
  # init_checkpoint's loader takes it for ViT-demo, backbone values unchanged.
  config = digits_l2p.get_config()
  model = factory.create_model(config, num_classes=10)
  init = factory.init_params(model, jax.random.PRNGKey(0), config.input_size)
  loaded = pretrained.load_pretrained(config.init_checkpoint, init, config.model_name)
  np.testing.assert_array_equal(loaded["Transformer"]["encoderblock_3"]["MlpBlock_3"]["Dense_0"]["kernel"],
                                flat["Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel"])
  assert loaded["head"]["kernel"].shape == (64, 10)


def test_shipped_checkpoint_names_unseen_glyphs():
  """The file is pretrained: its own head names fresh renders far above chance (1/72)."""
  params = traverse_util.unflatten_dict(_shipped(), sep="/")
  images, labels = glyphs.make_dataset(glyphs.draw_glyphs(), 1000, seed=12345)
  model = pretrain_vit.make_model(len(glyphs.CHARACTERS))
  accuracy = np.mean(np.argmax(pretrain_vit.predict(model, params, images), -1) == labels)
  assert accuracy > 0.6


def test_comparison_table_is_mean_and_spread_over_seeds():
  table = {"l2p": {"avg_acc": [80.0, 90.0, 85.0], "forgetting": [1.0, 3.0, 2.0]}}
  text = compare.format_table(table, [0, 1, 2])
  assert "| L2P | 85.00 +- 4.08 | 2.00 +- 0.82 |" in text
  assert "Seeds 0, 1, 2" in text


@pytest.mark.slow
def test_l2p_beats_sequential_fine_tuning(tmp_path):
  """The papers' qualitative result on the demo, as `python -m demo.compare` runs it (1 device).

  The margins hold for each of seeds 0, 1, 2 (README's table), for DualPrompt as for L2P; to
  keep the suite short, only L2P and sequential fine-tuning run here.
  """
  workdir = str(tmp_path / "compare")
  cmd = [sys.executable, "-m", "demo.compare", "--seeds", "0", "--workdir", workdir,
         "--methods", "ft_seq", "l2p"]
  done = run_util.run(cmd, run_util.env(1), timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "comparison.json")) as f:
    results = {m: {k: v[0] for k, v in r.items()} for m, r in json.load(f)["results"].items()}
  ft_seq, l2p = results["ft_seq"], results["l2p"]
  assert l2p["avg_acc"] >= ft_seq["avg_acc"] + 20, results
  assert l2p["forgetting"] <= ft_seq["forgetting"] / 2, results
