"""Tests of PromptedViT against a NumPy reference."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import factory
from models import vit
from models.prompted_vit import PromptedViT
from tests import model_util

TEST = vit.VARIANTS['ViT-test']
D, H = TEST.hidden_size, TEST.num_heads
HD = D // H
IMAGE, CLASSES = 32, 5


def fast_jit(fun, **kwargs):
  """jax.jit without LLVM's costly passes: compiling, not running, dominates
  these tests on CPU."""
  return jax.jit(fun, compiler_options={
      'xla_backend_optimization_level': 0,
      'xla_llvm_disable_expensive_passes': True}, **kwargs)


def _model(depth=TEST.num_layers, **kwargs) -> PromptedViT:
  """ViT-test; tests where depth plays no part use fewer blocks to compile
  faster."""
  return PromptedViT(
      hidden_size=D, patch_size=TEST.patch_size, num_layers=depth,
      num_heads=H, mlp_dim=TEST.mlp_dim, num_classes=CLASSES, **model_util.split(kwargs))


@functools.lru_cache
def _apply_fn(model):
  """Jitted apply returning ((logits, aux), intermediates), one per model."""
  def run(params, *args):
    out, state = model.apply({'params': params}, *args,
                             capture_intermediates=True)
    return out, state['intermediates']
  return fast_jit(run)


def _random_params(model, seed=0):
  """Random values everywhere (head included) so every part shows up."""
  shapes = factory.param_shapes(model, IMAGE)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape)
    if path[-1].key == 'scale':
      return (1.0 + 0.1 * noise).astype(np.float32)
    return (0.2 * noise).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _inputs(batch, seed=0):
  rng = np.random.default_rng(100 + seed)
  return rng.uniform(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)


def _queries_for(params, ids, seed=0):
  """Query features whose nearest key is `ids[b]` (keys are random)."""
  keys = np.asarray(params['e_prompt']['key'])
  noise = np.random.default_rng(200 + seed).normal(size=(len(ids), D))
  return (keys[np.asarray(ids)] + 0.01 * noise).astype(np.float32)


# --- NumPy reference --------------------------------------------------------


def _np_ln(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _np_attention(x, p, prefix):
  proj = lambda n: np.einsum('btd,dhk->bthk', x, p[n]['kernel']) + p[n]['bias']
  q, k, v = proj('query'), proj('key'), proj('value')
  if prefix is not None:
    k = np.concatenate([prefix[:, 0], k], axis=1)
    v = np.concatenate([prefix[:, 1], v], axis=1)
  logits = np.einsum('bthk,bshk->bhts', q, k) / np.sqrt(HD)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum('bhts,bshk->bthk', w, v)
  return np.einsum('bthk,hkd->btd', out, p['out']['kernel']) + p['out']['bias']


def _np_block(x, p, prefix):
  x = x + _np_attention(_np_ln(x, p['LayerNorm_0']),
                        p['MultiHeadDotProductAttention_1'], prefix)
  y = _np_ln(x, p['LayerNorm_2'])
  mlp = p['MlpBlock_3']
  y = y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias']
  y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
  return x + y @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']


def _np_encode(params, images, tokens=None, prefixes=None):
  """[B, T, D] encoder output; tokens/prefixes: dicts layer -> [B, ...]."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens, prefixes = tokens or {}, prefixes or {}
  b, p = images.shape[0], TEST.patch_size
  grid = IMAGE // p
  patches = images.reshape(b, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5)
  x = np.einsum('bhwijc,ijcd->bhwd', patches, params['embedding']['kernel'])
  x = (x + params['embedding']['bias']).reshape(b, grid * grid, D)
  x = np.concatenate([np.broadcast_to(params['cls'], (b, 1, D)), x], axis=1)
  enc = params['Transformer']
  x = x + enc['posembed_input']['pos_embedding']
  for i in range(TEST.num_layers):
    if i in tokens:
      x = np.concatenate([tokens[i], x], axis=1)
    x = _np_block(x, enc[f'encoderblock_{i}'], prefixes.get(i))
  return _np_ln(x, enc['encoder_norm'])


def _np_head(params, pre_logits):
  head = params['head']
  return pre_logits @ np.asarray(head['kernel']) + np.asarray(head['bias'])


# --- Forward pass against the reference ------------------------------------


def test_plain_vit_matches_reference():
  model = _model()
  params = _random_params(model)
  images = _inputs(2)
  logits, aux = fast_jit(model.apply)({'params': params}, images)
  encoded = _np_encode(params, images)
  np.testing.assert_allclose(aux['pre_logits'], encoded[:, 0], atol=2e-4)
  np.testing.assert_allclose(logits, _np_head(params, encoded[:, 0]),
                             atol=2e-4)
  assert logits.dtype == jnp.float32 and 'prompt_idx' not in aux


def _expected_ids(params, queries, top_k):
  keys = np.asarray(params['e_prompt']['key'], np.float64)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sim = q @ keys.T
  ids = np.argsort(-sim, axis=1, kind='stable')[:, :top_k]
  return ids, np.take_along_axis(sim, ids, axis=1).sum() / len(q)


@pytest.mark.parametrize('case', ['l2p', 'mixed'])
def test_prompt_tuning_matches_reference(case):
  """L2P: pool prompts before [cls, patches] at block 0, 'prompt' pooling.

  'mixed' also prepends a G-Prompt (first) and E-Prompts at later blocks and
  pools with 'token+prompt'.
  """
  if case == 'l2p':
    model = _model(classifier='prompt', use_e_prompt=True,
                   e_prompt_layers=(0,), pool_size=6, prompt_length=3,
                   top_k=2)
  else:
    model = _model(classifier='token+prompt', use_g_prompt=True,
                   g_prompt_prefix=False, g_prompt_length=2,
                   g_prompt_layers=(0, 1), use_e_prompt=True,
                   e_prompt_layers=(0, 2), pool_size=6, prompt_length=3,
                   top_k=2)
  params = _random_params(model, seed=1)
  images = _inputs(3, seed=1)
  queries = _queries_for(params, [4, 1, 2], seed=1)
  (logits, aux), inter = _apply_fn(model)(params, images, queries)

  ids, reduce_sim = _expected_ids(params, queries, top_k=2)
  np.testing.assert_array_equal(aux['prompt_idx'], ids)
  np.testing.assert_allclose(aux['reduce_sim'], reduce_sim, rtol=1e-5)
  pool = np.asarray(params['e_prompt']['prompt'])
  tokens = {}
  if case == 'l2p':
    tokens[0] = np.stack([np.concatenate(pool[i], axis=0) for i in ids])
  else:
    g = np.asarray(params['g_prompt']['prompt'])  # [2 layers, 2, D]
    for j, layer in enumerate((0, 2)):
      tokens[layer] = np.stack(
          [np.concatenate([pool[i, j] for i in row], axis=0) for row in ids])
    for j, layer in enumerate((0, 1)):
      old = tokens.get(layer, np.zeros((3, 0, D)))
      tokens[layer] = np.concatenate(
          [np.broadcast_to(g[j], (3,) + g[j].shape), old], axis=1)
  n_prompt = sum(t.shape[1] for t in tokens.values())
  assert n_prompt == model.total_prompt_len
  encoded = _np_encode(params, images, tokens=tokens)
  assert encoded.shape[1] == n_prompt + 1 + (IMAGE // TEST.patch_size) ** 2
  if case == 'l2p':
    pre_logits = encoded[:, :n_prompt].mean(axis=1)
  else:
    pre_logits = encoded[:, :n_prompt + 1].mean(axis=1)
  np.testing.assert_allclose(aux['pre_logits'], pre_logits, atol=2e-4)
  np.testing.assert_allclose(logits, _np_head(params, pre_logits), atol=2e-4)

  # The pooled positions, read from the model's own encoder output.
  got = np.asarray(inter['Transformer']['__call__'][0])
  assert got.shape == encoded.shape
  end = n_prompt if case == 'l2p' else n_prompt + 1
  np.testing.assert_allclose(aux['pre_logits'], got[:, :end].mean(axis=1),
                             rtol=1e-6, atol=1e-6)
  for shifted in (got[:, 1:end + 1], got[:, :end + 1], got[:, :end - 1]):
    assert not np.allclose(aux['pre_logits'], shifted.mean(axis=1))


def _dualprompt(**kwargs):
  fields = dict(use_g_prompt=True, g_prompt_length=2, g_prompt_layers=(0, 1),
                use_e_prompt=True, e_prompt_layers=(2, 3, 4),
                e_prompt_prefix=True, pool_size=4, prompt_length=3, top_k=1)
  fields.update(kwargs)
  return _model(**fields)


def test_dualprompt_prefix_matches_reference_and_keeps_token_count():
  model = _dualprompt()
  params = _random_params(model, seed=2)
  images = _inputs(3, seed=2)
  queries = _queries_for(params, [3, 0, 2], seed=2)
  (logits, aux), inter = _apply_fn(model)(params, images, queries)
  np.testing.assert_array_equal(aux['prompt_idx'], [[3], [0], [2]])
  # Prefixes extend keys and values only: every block keeps 1 + 16 tokens.
  for i in range(TEST.num_layers):
    out = inter['Transformer'][f'encoderblock_{i}']['__call__'][0]
    assert out.shape == (3, 1 + (IMAGE // TEST.patch_size) ** 2, D), i
  g = np.asarray(params['g_prompt']['prompt'])  # [2, 2, len, H, hd]
  e = np.asarray(params['e_prompt']['prompt'])  # [pool, 3, 2, len, H, hd]
  prefixes = {layer: np.broadcast_to(g[j], (3,) + g[j].shape)
              for j, layer in enumerate((0, 1))}
  for j, layer in enumerate((2, 3, 4)):
    prefixes[layer] = e[[3, 0, 2], j]
  encoded = _np_encode(params, images, prefixes=prefixes)
  np.testing.assert_allclose(logits, _np_head(params, encoded[:, 0]),
                             atol=2e-4)


def test_per_sample_prefixes_match_each_image_alone():
  model = _dualprompt()
  params = _random_params(model, seed=3)
  images = _inputs(3, seed=3)
  queries = _queries_for(params, [1, 3, 0], seed=3)
  apply = _apply_fn(model)
  (logits, aux), _ = apply(params, images, queries)
  np.testing.assert_array_equal(aux['prompt_idx'][:, 0], [1, 3, 0])
  for b in range(3):
    (alone, _), _ = apply(params, images[b:b + 1], queries[b:b + 1])
    np.testing.assert_allclose(logits[b], alone[0], rtol=1e-5, atol=1e-5)
  # The prompts matter: image 0 with image 1's prompt gives other logits.
  (swapped, _), _ = apply(params, images[:1], queries[1:2])
  assert np.abs(np.asarray(swapped[0] - logits[0])).max() > 1e-2


# --- Pooling ------------------------------------------------------------


@pytest.mark.parametrize('classifier,select', [
    ('token', lambda x: x[:, 6]),
    ('token+prompt', lambda x: x[:, :7].mean(axis=1)),
    # The original's 'gap' averages every token, prompts and class token too.
    ('gap', lambda x: x.mean(axis=1)),
])
def test_classifier_positions_with_prompt_tuning(classifier, select):
  model = _model(classifier=classifier, use_e_prompt=True,
                 e_prompt_layers=(0,), prompt_length=3, top_k=2)
  encoded = np.random.default_rng(6).normal(size=(2, 6 + 1 + 16, D))
  np.testing.assert_allclose(model._pool(encoded), select(encoded))


def test_gap_without_prompts_or_class_token():
  model = _model(classifier='gap', use_cls_token=False)
  encoded = np.random.default_rng(7).normal(size=(2, 16, D))
  np.testing.assert_allclose(model._pool(encoded), encoded.mean(axis=1))


def test_g_prompt_is_uniform_whatever_the_e_prompt_initializer():
  model = _model(depth=2, use_g_prompt=True, g_prompt_length=4, g_prompt_layers=(0, 1),
                 g_prompt_prefix=False, prompt_init='normal')
  params = model.init(jax.random.PRNGKey(0), _inputs(1))['params']
  g = np.asarray(params['g_prompt']['prompt'])
  # Flax's default uniform initializer: [0, 0.01); 'normal' has stddev 0.01 and negatives.
  assert g.min() >= 0.0 and g.max() < 0.01 and g.std() > 0.001


# --- Precision, dropout, temperature ----------------------------------------


def test_bfloat16_logits_close_to_float32():
  params = _random_params(_dualprompt(), seed=8)
  images, queries = _inputs(2), _queries_for(params, [0, 1])

  @fast_jit
  def run():
    return [_dualprompt(dtype=dtype).apply({'params': params}, images, queries)
            for dtype in (jnp.float32, jnp.bfloat16)]

  outs = dict(zip((jnp.float32, jnp.bfloat16), run()))
  logits32, logits16 = outs[jnp.float32][0], outs[jnp.bfloat16][0]
  assert logits16.dtype == jnp.float32
  # bfloat16 keeps 8 mantissa bits; 6 blocks stay within 5% of the logit
  # scale here.
  scale = float(jnp.abs(logits32).max())
  assert float(jnp.abs(logits16 - logits32).max()) < 0.05 * scale
  np.testing.assert_array_equal(outs[jnp.float32][1]['prompt_idx'],
                                outs[jnp.bfloat16][1]['prompt_idx'])


def test_norm_pre_logits_and_temperature():
  params = _random_params(_model(depth=1), seed=9)
  images = _inputs(2)
  model = _model(depth=1, norm_pre_logits=True, temperature=0.5)
  logits, aux = fast_jit(model.apply)({'params': params}, images)
  pre = np.asarray(aux['pre_logits'])
  unit = pre / np.linalg.norm(pre, axis=1, keepdims=True)
  np.testing.assert_allclose(logits, _np_head(params, unit) / 0.5, rtol=1e-5,
                             atol=1e-5)


def test_dropout_only_at_train_time():
  model = _model(depth=1, dropout_rate=0.3)
  params = _random_params(model, seed=10)
  images = _inputs(2)

  @fast_jit
  def run(rng):
    train, _ = model.apply({'params': params}, images, train=True,
                           rngs={'dropout': rng})
    test, _ = model.apply({'params': params}, images, train=False)
    plain, _ = _model(depth=1).apply({'params': params}, images)
    return train, test, plain

  # RngBitGenerator keys compile much faster than threefry on CPU.
  train_a, test_a, plain = run(jax.random.key(0, impl='unsafe_rbg'))
  train_b, test_b, _ = run(jax.random.key(1, impl='unsafe_rbg'))
  np.testing.assert_array_equal(test_a, test_b)
  np.testing.assert_allclose(test_a, plain, rtol=1e-6, atol=1e-6)
  assert not np.allclose(train_a, train_b)


# --- Gradients under a frozen backbone --------------------------------------


def test_only_prompts_keys_and_head_train_under_frozen_mask():
  model = _dualprompt(depth=2, g_prompt_layers=(0,), e_prompt_layers=(1,), use_prompt_mask=True)
  params = _random_params(model, seed=11)
  images, labels = _inputs(2), jnp.array([1, 3])
  queries = _queries_for(params, [0, 1], seed=11)
  # Task 2's slot (top_k 1), forced in its first step.
  task = {'prompt_ids': jnp.array([2], jnp.int32), 'mask_steps': jnp.int32(1), 'task_step': jnp.int32(0)}

  @fast_jit
  def grads(p):
    def loss_fn(p):
      logits, aux = model.apply({'params': p}, images, queries, task=task, train=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return ce.mean() - 0.5 * aux['reduce_sim']
    return jax.grad(loss_fn)(p)

  flat = flax.traverse_util.flatten_dict(grads(params), sep='/')
  frozen = {k for k in flat if any(s in k for s in ('encoder', 'embedding',
                                                    'cls'))}
  assert 'Transformer/posembed_input/pos_embedding' in frozen
  trainable = {k for k in flat if k not in frozen and np.any(flat[k])}
  assert trainable == {'e_prompt/prompt', 'e_prompt/key', 'g_prompt/prompt',
                       'head/kernel', 'head/bias'}
  # The mask matters: the backbone does receive gradients.
  assert np.any(flat['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'])
  # Only the forced pool slot (2) gets prompt and key gradients.
  for name in ('e_prompt/prompt', 'e_prompt/key'):
    touched = np.flatnonzero(np.abs(flat[name]).reshape(4, -1).sum(axis=1))
    np.testing.assert_array_equal(touched, [2])


@pytest.mark.parametrize('name,rate', [('ViT-B_16', 0.0), ('ViT-L_16', 0.1), ('ViT-L_32', 0.0),
                                       ('ViT-H_14', 0.1), ('ViT-S_16', 0.0)])
def test_dropout_follows_the_variant_unless_the_config_sets_it(name, rate):
  from configs import common
  config = common.get_base_config()
  config.model_name = name
  # The original's release configs: 0.1 for ViT-L/16 and ViT-H/14 only.
  assert factory.create_model(config, 10).dropout_rate == rate
  config.dropout_rate = 0.25
  assert factory.create_model(config, 10).dropout_rate == 0.25
