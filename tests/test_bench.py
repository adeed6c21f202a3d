"""Analytic FLOP count (against hand computations) and the benchmarks, end to end on CPU."""

import functools
import json
import math
import os
import re
import subprocess
import sys

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import pytest

from bench import flops
from configs import cifar100_dualprompt
from configs import cifar100_l2p
from libml import optim
from libml import steps
from libml import train_state
from models import factory
from tests import forked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10

# ViT-test on 32x32 images: D=32, patch 8 (N=16 patches, 8*8*3=192 values each), 6 blocks, MLP 64.
EMBEDDING = 2 * 16 * 192 * 32  # 196,608
HEAD = 2 * 32 * NUM_CLASSES  # 640
# One block on 17 tokens (class token + 16 patches) without prompts:
# qkv 3*2*17*32*32 = 104,448; QK^T and AV 2*17*17*32 = 18,496 each; out 2*17*32*32 = 34,816;
# MLP 2*2*17*32*64 = 139,264.
BLOCK_17 = 315_520
ATTN_PER_KEY_17 = 2 * 2 * 17 * 32  # QK^T + AV per key token at 17 queries: 2,176


def _l2p(**overrides):
  config = cifar100_l2p.get_config()
  config.model_name, config.input_size = "ViT-test", 32
  config.prompt_pool_param.length, config.prompt_pool_param.top_k = 2, 2
  config.update(overrides)
  return config


def _dualprompt(**overrides):
  config = cifar100_dualprompt.get_config()
  config.model_name, config.input_size = "ViT-test", 32
  config.g_prompt_length = 2
  config.prompt_pool_param.length = 3
  config.update(overrides)
  return config


def _models(config):
  return factory.create_model(config, NUM_CLASSES), factory.create_query_model(config, NUM_CLASSES)


def test_l2p_forward_by_hand():
  model, query_model = _models(_l2p())
  # top_k 2 x length 2 = 4 prompt tokens at block 0: every block sees 21 tokens.
  # qkv 3*2*21*32*32 = 129,024; QK^T, AV 2*21*21*32 = 28,224 each; out 43,008; MLP 172,032.
  fwd = flops.forward_flops(model, 32)
  assert fwd.embedding == EMBEDDING and fwd.head == HEAD
  assert fwd.blocks[0] == {"qkv": 129_024, "scores": 28_224, "values": 28_224, "out": 43_008, "mlp": 172_032}
  assert fwd.total == 196_608 + 6 * 400_512 + 640 == 2_600_320
  # The query ViT: 17 tokens, no head.
  assert flops.forward_flops(query_model, 32, head=False).total == EMBEDDING + 6 * BLOCK_17 == 2_089_728


def test_l2p_train_step_by_hand():
  model, query_model = _models(_l2p())
  full = flops.step_flops(model, 32, query_model=query_model, clip_mode="full",
                          freeze_part=("encoder", "embedding", "cls"))
  # Activations: every block's products once more, its QK^T and AV twice more, the head's input.
  assert full.backward_activations == 6 * (400_512 + 2 * 28_224) + HEAD == 2_742_400
  assert full.backward_trainable_weights == HEAD
  # Frozen weights: the patch embedding and each block's qkv + out + MLP.
  assert full.backward_frozen_weights == EMBEDDING + 6 * (129_024 + 43_008 + 172_032) == 2_260_992
  # The backward is twice the forward, less the images' gradient, which nothing needs.
  backward = full.backward_activations + full.backward_trainable_weights + full.backward_frozen_weights
  assert backward == 2 * full.prompted_forward - EMBEDDING
  assert full.train == 2_089_728 + 2_600_320 + backward == 9_694_080
  assert full.eval_cached_query == 2_600_320 and full.eval_with_query == 2_089_728 + 2_600_320

  trainable = flops.step_flops(model, 32, query_model=query_model, clip_mode="trainable",
                               freeze_part=("encoder", "embedding", "cls"))
  assert trainable.backward_frozen_weights == 0
  assert trainable.backward_activations == full.backward_activations
  assert full.train - trainable.train == full.backward_frozen_weights


def test_dualprompt_prefixes_lengthen_keys_only():
  model, _ = _models(_dualprompt())
  assert flops.prompt_layout(model) == flops.PromptLayout(tokens=(0,) * 6, prefix=(2, 2, 3, 3, 3, 0))
  fwd = flops.forward_flops(model, 32)
  # 17 queries everywhere; keys 19, 19, 20, 20, 20, 17.
  assert [b["scores"] for b in fwd.blocks] == [2 * 17 * s * 32 for s in (19, 19, 20, 20, 20, 17)]
  assert fwd.blocks[2]["qkv"] == 104_448 and fwd.blocks[2]["mlp"] == 139_264
  no_attention = BLOCK_17 - 17 * ATTN_PER_KEY_17  # 278,528
  assert fwd.total == EMBEDDING + 6 * no_attention + ATTN_PER_KEY_17 * (19 + 19 + 20 + 20 + 20 + 17) + HEAD
  assert fwd.total == 2_118_656


def test_trainable_backward_starts_at_first_prompted_block():
  # E-Prompt prefixes at blocks 2-4 only: with trainable-only gradients, blocks 0-1 need no backward.
  model, _ = _models(_dualprompt(use_g_prompt=False))
  kw = dict(freeze_part=("encoder", "embedding", "cls"))
  trainable = flops.step_flops(model, 32, clip_mode="trainable", **kw)
  block_20 = BLOCK_17 + 3 * ATTN_PER_KEY_17  # 20 keys
  # Blocks 2-5 (keys 20, 20, 20, 17), their attention products again, and the head's input gradient,
  # less block 2's input gradient (qkv 104,448) and query gradient (2*17*20*32 = 21,760): only its
  # prefixes are differentiated.
  expected = 3 * block_20 + BLOCK_17 + ATTN_PER_KEY_17 * (3 * 20 + 17) + HEAD - 104_448 - 21_760
  assert trainable.backward_activations == expected == 1_323_648
  assert trainable.query_forward == 0
  full = flops.step_flops(model, 32, clip_mode="full", **kw)
  assert full.backward_activations == 3 * block_20 + 3 * BLOCK_17 + ATTN_PER_KEY_17 * (3 * 20 + 3 * 17) + HEAD


def test_prefix_only_first_block_needs_no_input_or_query_gradient():
  model, _ = _models(_dualprompt())  # G-Prompt prefixes from block 0
  kw = dict(freeze_part=("encoder", "embedding", "cls"))
  full = flops.step_flops(model, 32, clip_mode="full", **kw)
  trainable = flops.step_flops(model, 32, clip_mode="trainable", **kw)
  assert full.backward_activations - trainable.backward_activations == 104_448 + 2 * 17 * 19 * 32


def test_unfrozen_backbone_weights_count_as_trainable():
  model, _ = _models(_l2p())
  step = flops.step_flops(model, 32, clip_mode="trainable", freeze_part=())
  assert step.backward_frozen_weights == 0
  assert step.backward_trainable_weights == 2_260_992 + HEAD


def test_vit_b16_matches_published_count():
  # ViT-B/16 at 224x224 is quoted as 17.6 G multiply-adds per image (DeiT, timm).
  config = cifar100_l2p.get_config()
  fwd = flops.forward_flops(factory.create_query_model(config, 1000), 224, head=False)
  assert fwd.total / 2 == pytest.approx(17.56e9, rel=0.005)
  with pytest.raises(ValueError, match="multiple of the patch size"):
    flops.forward_flops(factory.create_query_model(config, 1000), 220)


def _jaxpr_matmul_flops(jaxpr, skip: str) -> int:
  """2 x multiply-adds of every dot_general and convolution in `jaxpr` and its sub-jaxprs.

  Products whose name stack contains `skip` are left out.
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    assert name not in ("scan", "while"), "loops would need their trip count"
    out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
    if skip in str(eqn.source_info.name_stack):
      pass
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      total += 2 * out * math.prod(eqn.invars[0].aval.shape[d] for d in contract)
    elif name == "conv_general_dilated":
      kernel, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
      total += 2 * out * math.prod(kernel[d] for d in spec[1:])  # input features x window
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          total += _jaxpr_matmul_flops(sub.jaxpr, skip)
        elif isinstance(sub, jax_core.Jaxpr):
          total += _jaxpr_matmul_flops(sub, skip)
  return total


@pytest.mark.parametrize("method,clip_mode", [("l2p", "full"), ("dualprompt", "trainable")])
def test_count_matches_the_products_of_the_real_train_step(method, clip_mode):
  """The analytic count against the products JAX traces for `steps.train_step`, backward included."""
  config = _l2p() if method == "l2p" else _dualprompt()
  model, query_model = _models(config)
  params = factory.param_shapes(model, 32)
  query_keys = factory.param_shapes(query_model, 32).keys()
  tx = optim.create_optimizer(config, params)
  spec = jax.ShapeDtypeStruct
  batch = {"image": spec((4, 32, 32, 3), jnp.float32), "label": spec((4,), jnp.int32)}
  task = {"class_mask": spec((NUM_CLASSES,), bool), "steps_per_epoch": spec((), jnp.float32),
          "num_epochs": spec((), jnp.float32),
          "method": model.method.task_arrays(0, steps_per_epoch=1, num_steps=1)}
  step = functools.partial(steps.train_step, model=model, query_model=query_model, tx=tx,
                           options=steps.StepOptions.from_config(config, 4, clip_mode))
  jaxpr = jax.make_jaxpr(step, axis_env=[(steps.AXIS, 1)])(
      jax.eval_shape(lambda: train_state.create(params, tx)), batch, {k: params[k] for k in query_keys}, task,
      jax.random.PRNGKey(0))
  # Prompt-key matching is left out of the count by convention; the query ViT's head is traced but
  # unused (the compiler drops it).
  traced = _jaxpr_matmul_flops(jaxpr.jaxpr, skip="e_prompt") / 4 - HEAD
  expected = flops.step_flops(model, 32, query_model=query_model, clip_mode=clip_mode, freeze_part=config.freeze_part)
  assert traced == expected.train


# Runs the script given after it with TensorFlow, TensorFlow Datasets and clu unimportable, as on a
# machine that has only JAX and its libraries.
_WITHOUT_TENSORFLOW = ("import runpy, sys\n"
                       "for name in ('tensorflow', 'tensorflow_datasets', 'clu'):\n"
                       "  sys.modules[name] = None\n"
                       "sys.argv = sys.argv[1:]\n"
                       "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.mark.parametrize("source_size", [0, 8])
def test_benchmark_runs_end_to_end_on_cpu_without_tensorflow(tmp_path, source_size):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             # Two devices as in training; unoptimised CPU code compiles faster (the figures are not checked).
             XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
  cmd = [sys.executable, "-c", _WITHOUT_TENSORFLOW, os.path.join(REPO, "bench", "step_benchmark.py"),
         "--config", "cifar100_l2p", "--model_name", "ViT-test", "--input_size", "32", "--global_batch", "4",
         "--steps", "2", "--warmup", "1", "--peak_tflops", "0.5", "--source_size", str(source_size),
         "--json_out", str(out)]
  proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "train clip=full" in proc.stdout and "eval cached_query" in proc.stdout
  record = json.loads(out.read_text())

  assert record["device_count"] == 2 and record["global_batch"] == 4 and record["per_device_batch"] == 2
  assert record["vote_group_size"] == 16 and record["dtype"] == "float32" and record["attention_impl"] == "xla"
  assert record["device_kind"] and record["jax_version"] and "--global_batch 4" in record["command"]
  assert set(record["train"]) == {"trainable", "full"}
  assert set(record["eval"]) == {"cached_query", "with_query"}
  # With stored 8x8 images the steps build the inputs, and that is also timed alone.
  assert record["source_size"] == (source_size or None)
  assert set(record.get("preprocess_on_device", {})) == ({"train", "eval"} if source_size else set())
  assert ("train inputs alone" in proc.stdout) == bool(source_size)

  config = cifar100_l2p.get_config()
  config.model_name = "ViT-test"
  model, query_model = factory.create_model(config, 100), factory.create_query_model(config, 100)
  for mode, train in record["train"].items():
    assert train["clip_mode"] == mode
    expected = flops.step_flops(model, 32, query_model=query_model, clip_mode=mode, freeze_part=config.freeze_part)
    assert train["flops_per_image"] == expected.as_dict()
    assert train["ms_per_step_median"] > 0 and train["ms_per_step_mean"] > 0
    assert train["images_per_s"] == pytest.approx(4 / (train["ms_per_step_median"] / 1e3))
    assert train["achieved_tflops_per_s"] == pytest.approx(expected.train * train["images_per_s"] / 1e12)
    assert train["mfu"] == pytest.approx(train["achieved_tflops_per_s"] / (0.5 * 2))
    assert "peak_memory_bytes" in train  # null on CPU
  for name, ev in record["eval"].items():
    assert ev["images_per_s"] > 0 and ev["mfu"] > 0
    assert ev["flops_per_image"] == (expected.eval_cached_query if name == "cached_query" else expected.eval_with_query)
    for mode, train in record["train"].items():
      assert record["eval_vs_train"][mode][name] == pytest.approx(ev["images_per_s"] / train["images_per_s"])


# Per batch of 2 x 4: float32 16x16x3 inputs or uint8 32x32x3 stored images, 24 KiB either way.
@pytest.mark.parametrize("script, args, wanted", [
    ("input_pipeline.py", ["--steps", "2", "--warmup_steps", "1", "--num_examples", "400", "--devices", "2",
                           "--per_device_batch_size", "4", "--input_size", "16", "--resize_size", "18"],
     r"batches \(2, 4, 16, 16, 3\) .*\n\d+ images/s, 0\.02 MiB per batch"),
    ("input_pipeline.py", ["--steps", "2", "--warmup_steps", "1", "--num_examples", "400", "--devices", "2",
                           "--per_device_batch_size", "4", "--on_device"],
     r"batches \(2, 4, 32, 32, 3\) .*\n\d+ images/s, 0\.02 MiB per batch"),
    # 300 images of 128 x 128 x 3 bytes: 14.06 MiB.
    ("load_memory.py", ["--num_examples", "300"],
     r"300 images \(128, 128, 3\): 14 MiB decoded\nwhile loading: \+\d+ MiB \([\d.]+x the images\)"),
])
def test_host_benchmarks_run_on_generated_data(tmp_path, script, args, wanted):
  proc = forked.run([sys.executable, os.path.join(REPO, "bench", script), *args],
                    dict(os.environ, CUDA_VISIBLE_DEVICES=""), str(tmp_path), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(wanted, proc.stdout), proc.stdout
