"""CODA-Prompt against NumPy re-statements of the paper's equations and the official code."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar100_coda
from configs import digits_coda
from models.methods import base
from models.methods import coda

D, H, POOL, TASKS, LENGTH, LAYERS = 8, 2, 6, 3, 4, (0, 1)
DIMS = base.Dims(num_layers=3, hidden_size=D, num_heads=H)
BATCH = 3


def _method(**kwargs):
  fields = dict(pool_size=POOL, length=LENGTH, layers=LAYERS, num_tasks=TASKS, ortho_mu=0.0)
  fields.update(kwargs)
  return coda.CodaPrompt(**fields)


class Host(nn.Module):
  """The smallest model that runs a method's `prompts` inside a compact `__call__`."""
  method: coda.CodaPrompt
  train: bool

  @nn.compact
  def __call__(self, x_embed, cls_features, task):
    return self.method.prompts(x_embed, cls_features, task, None, self.train, DIMS)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x_embed = jnp.zeros((BATCH, 5, D), jnp.float32)
  query = rng.standard_normal((BATCH, D)).astype(np.float32)
  return x_embed, query


def _params(method, seed=1):
  """Host parameters with normal (not uniform) values, so that weights take both signs."""
  x_embed, query = _inputs()
  shapes = jax.eval_shape(Host(method, train=False).init, jax.random.PRNGKey(0), x_embed, query,
                          method.task_arrays(0, steps_per_epoch=1, num_steps=1))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes['params'])


def _apply(method, train):
  host = Host(method, train=train)
  return jax.jit(lambda params, query, task: host.apply({'params': params}, _inputs()[0], query, task))


def _reference_prefixes(params, query, active):
  """The paper's equations per block, components [0, active), as in the official forward."""
  out = {}
  for j, layer in enumerate(LAYERS):
    e = {name: np.asarray(params['e_prompt'][name][:active, j], np.float64)
         for name in ('prompt', 'key', 'attention')}
    a = query[:, None, :].astype(np.float64) * e['attention'][None]  # [B, k, D]
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    k = e['key'] / np.maximum(np.linalg.norm(e['key'], axis=-1, keepdims=True), 1e-12)
    alpha = np.einsum('bkd,kd->bk', a, k)
    mixed = np.einsum('bk,kld->bld', alpha, e['prompt'])
    half = LENGTH // 2
    keys, values = mixed[:, :half], mixed[:, half:]
    out[layer] = np.stack([keys.reshape(BATCH, -1, H, D // H), values.reshape(BATCH, -1, H, D // H)], 1)
  return out


def _reference_penalty(params, active):
  total = 0.0
  for j in range(len(LAYERS)):
    for name in ('key', 'attention', 'prompt'):
      x = np.asarray(params['e_prompt'][name][:active, j], np.float64).reshape(active, -1)
      total += np.mean(np.square(x @ x.T - np.eye(active)))
  return total


@pytest.mark.parametrize('train', [False, True])
def test_prefixes_match_numpy(train):
  method = _method()
  params = _params(method)
  _, query = _inputs()
  task = method.task_arrays(1, steps_per_epoch=1, num_steps=1)
  assert (int(task['num_frozen']), int(task['num_active'])) == (2, 4)
  got = _apply(method, train)(params, query, task)
  want = _reference_prefixes(params, query, active=4)
  assert got.prefixes[2] is None and got.tokens == (None,) * 3
  for layer in LAYERS:
    assert got.prefixes[layer].shape == (BATCH, 2, LENGTH // 2, H, D // H)
    np.testing.assert_allclose(got.prefixes[layer], want[layer], rtol=1e-5, atol=1e-5)
  assert got.loss is None and 'prompt_idx' not in got.aux
  assert method.histogram_size == 0 and method.prompt_tokens == 0 and method.needs_query


def test_components_beyond_the_task_have_no_effect():
  method = _method()
  params = _params(method)
  _, query = _inputs()
  task = method.task_arrays(1, steps_per_epoch=1, num_steps=1)
  changed = jax.tree.map(lambda x: x.copy(), params)
  for value in changed['e_prompt'].values():
    value[4:] = 100.0 * np.random.default_rng(7).standard_normal(value[4:].shape)
  for train in (False, True):
    fn = _apply(method if not train else _method(ortho_mu=0.5), train)
    before, after = fn(params, query, task), fn(changed, query, task)
    for layer in LAYERS:
      np.testing.assert_array_equal(before.prefixes[layer], after.prefixes[layer])
    if train:
      np.testing.assert_array_equal(before.loss, after.loss)


@pytest.mark.parametrize('ortho_mu', [0.0, 0.5])
def test_gradients_of_frozen_and_later_components_are_zero(ortho_mu):
  method = _method(ortho_mu=ortho_mu)
  params = _params(method)
  _, query = _inputs()
  task = method.task_arrays(1, steps_per_epoch=1, num_steps=1)
  host = Host(method, train=True)

  def objective(p):
    out = host.apply({'params': p}, _inputs()[0], query, task)
    total = sum(jnp.sum(out.prefixes[layer]) for layer in LAYERS)
    return total + (out.loss if out.loss is not None else 0.0)

  grads = jax.jit(jax.grad(objective))(params)['e_prompt']
  for name, g in grads.items():
    g = np.asarray(g)
    np.testing.assert_array_equal(g[:2], 0.0, err_msg=f'{name} frozen')
    np.testing.assert_array_equal(g[4:], 0.0, err_msg=f'{name} inactive')
    for k in (2, 3):
      for j in range(len(LAYERS)):
        assert np.abs(g[k, j]).sum() > 0, (name, k, j)


def test_ortho_penalty_matches_numpy():
  method = _method(ortho_mu=0.5)
  params = _params(method)
  _, query = _inputs()
  for task_id, active in ((0, 2), (1, 4), (2, 6)):
    task = method.task_arrays(task_id, steps_per_epoch=1, num_steps=1)
    out = _apply(method, True)(params, query, task)
    want = _reference_penalty(params, active)
    np.testing.assert_allclose(out.aux['ortho_penalty'], want, rtol=1e-5)
    np.testing.assert_allclose(out.loss, 0.5 * want, rtol=1e-5)
  assert _apply(method, False)(params, query, task).loss is None
  off = _apply(_method(ortho_mu=0.0), True)(params, query, task)
  assert off.loss is None and 'ortho_penalty' not in off.aux


def _flat(params, name):
  """[pool, L, M] float64."""
  value = np.asarray(params['e_prompt'][name], np.float64)
  return value.reshape(POOL, len(LAYERS), -1)


def _uniform_params(method, seed=3):
  host = Host(method, train=False)
  x_embed, query = _inputs()
  task = method.task_arrays(0, steps_per_epoch=1, num_steps=1)
  params = jax.jit(host.init)(jax.random.PRNGKey(seed), x_embed, query, task)['params']
  return {**jax.tree.map(np.asarray, params), 'head': {'kernel': np.ones((2, 2), np.float32)}}


def test_initial_values_are_uniform_in_unit_interval():
  params = _uniform_params(_method())
  for name in ('prompt', 'key', 'attention'):
    value = params['e_prompt'][name]
    assert value.min() >= 0.0 and value.max() < 1.0 and value.max() > 0.5, name
  assert params['e_prompt']['prompt'].shape == (POOL, len(LAYERS), LENGTH, D)
  assert params['e_prompt']['key'].shape == params['e_prompt']['attention'].shape == (POOL, len(LAYERS), D)


def test_start_task_orthonormalises_the_new_components():
  method = _method()
  params = _uniform_params(method)
  first = method.start_task(params, 0, seed=5)
  second = method.start_task(first, 1, seed=5)
  assert first['head'] is params['head']
  for name in ('prompt', 'key', 'attention'):
    for j in range(len(LAYERS)):
      x = _flat(first, name)[:, j]
      np.testing.assert_allclose(x[:2] @ x[:2].T, np.eye(2), atol=1e-5)
      y = _flat(second, name)[:, j]
      np.testing.assert_allclose(y[:4] @ y[:4].T, np.eye(4), atol=1e-5)
    # Old components and those of later tasks are kept bit for bit.
    np.testing.assert_array_equal(first['e_prompt'][name][2:], params['e_prompt'][name][2:])
    np.testing.assert_array_equal(second['e_prompt'][name][:2], first['e_prompt'][name][:2])
    np.testing.assert_array_equal(second['e_prompt'][name][4:], params['e_prompt'][name][4:])
    assert second['e_prompt'][name].dtype == np.float32


def test_start_task_is_deterministic_in_the_seed():
  method = _method()
  params = _uniform_params(method)
  a, b, c = (method.start_task(params, 1, seed=s) for s in (5, 5, 6))
  for name in ('prompt', 'key', 'attention'):
    np.testing.assert_array_equal(a['e_prompt'][name], b['e_prompt'][name])
    assert not np.array_equal(a['e_prompt'][name][2:4], c['e_prompt'][name][2:4])


def _official_gram_schmidt(vv, s, f, draws):
  """The official `gram_schmidt` restated: columns, projections of each draw onto all j < k."""
  vv = vv.T
  uu = np.zeros_like(vv)
  uu[:, :s] = vv[:, :s]
  for k in range(s, f):
    vk = draws[k - s]
    uk = 0
    for j in range(k):
      uj = uu[:, j]
      uk = uk + (vk * uj).sum() / (uj * uj).sum() * uj
    uu[:, k] = vk - uk
  for k in range(s, f):
    uu[:, k] = uu[:, k] / np.linalg.norm(uu[:, k])
  # The official leaves these columns zero; both are re-drawn before use, and ours keeps them.
  uu[:, f:] = vv[:, f:]
  return uu.T


def test_start_task_matches_the_official_algorithm():
  # Old components that are not orthonormal (as after training) tell classical from modified
  # Gram-Schmidt.
  method = _method()
  params = _params(method, seed=11)
  task, (s, f) = 2, method.span(2)
  got = method.start_task(params, task, seed=9)
  rng = np.random.default_rng((9, task))
  for name in ('prompt', 'key', 'attention'):
    for j in range(len(LAYERS)):
      draws = rng.standard_normal((f - s, _flat(params, name).shape[-1]))
      want = _official_gram_schmidt(_flat(params, name)[:, j], s, f, draws)
      np.testing.assert_allclose(_flat(got, name)[:, j], want, rtol=1e-5, atol=1e-6)


def test_gram_schmidt_skips_vanishing_old_rows():
  vectors = np.zeros((3, 4))
  vectors[0, 0] = 1.0
  out = coda.gram_schmidt(vectors, 2, np.ones((1, 4)))
  np.testing.assert_allclose(out[2], [0.0, 1 / np.sqrt(3)] + [1 / np.sqrt(3)] * 2)


@pytest.mark.parametrize('fields', [
    dict(layers=(3,)),
    dict(layers=(0, 0)),
    dict(layers=()),
    dict(length=3),
    dict(length=0),
    dict(pool_size=5),
    dict(pool_size=2),
    dict(pool_size=12, length=2),
    dict(ortho_mu=-0.1),
])
def test_check_rejects_bad_settings(fields):
  method = _method(**fields)  # constructing never raises
  with pytest.raises(ValueError):
    method.check(DIMS)


def test_check_accepts_a_valid_setting_and_from_config_reads_the_fields():
  _method().check(DIMS)
  config = cifar100_coda.get_config()
  config.update_from_flattened_dict({
      'coda_prompt_param.pool_size': 6, 'coda_prompt_param.length': 4, 'coda_prompt_param.layer_idx': (0, 1),
      'coda_prompt_param.ortho_mu': 0.0, 'continual.num_tasks': 3})
  method = coda.CodaPrompt.from_config(config)
  assert method == _method() and isinstance(method.ortho_mu, float)
  hash(method)
  with pytest.raises(ValueError):
    method.task_arrays(3, steps_per_epoch=1, num_steps=1)


def test_a_run_freezes_the_first_tasks_components_and_evaluates_with_all_it_trained(tmp_path):
  """The CODA digits demo, tiny: 2 tasks of 4 steps, 4 components each, at blocks 0-4."""
  import train_continual  # pylint: disable=g-import-not-at-top
  from libml import train_state  # pylint: disable=g-import-not-at-top
  config = digits_coda.get_config('tiny')
  assert config.method == 'coda' and config.coda_prompt_param.pool_size == 8
  after_task = {}
  original = train_continual._Runner.train_task  # pylint: disable=protected-access

  def train_task(self, task, *args):
    out = original(self, task, *args)
    after_task[task] = train_state.host_copy(self.state.params['e_prompt'])
    return out

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_continual._Runner, 'train_task', train_task)  # pylint: disable=protected-access
    out = train_continual.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(out['avg_acc']) and not np.isnan(out['accuracy_matrix'][:, 1]).any()
  for name in ('prompt', 'key', 'attention'):
    first, second = after_task[0][name], after_task[1][name]
    np.testing.assert_array_equal(second[:4], first[:4], err_msg=name)  # task 0's, frozen in task 1
    assert np.all(np.any(second[4:] != first[4:], axis=tuple(range(1, first.ndim)))), name  # re-drawn, trained


@pytest.mark.parametrize('name,dataset,per_task,epochs', [('cifar100_coda', 'cifar100', 10, 20),
                                                          ('imr_coda', 'imagenet_r', 20, 50)])
def test_configs_hold_the_official_settings(name, dataset, per_task, epochs):
  """GT-RIPL/CODA-Prompt experiments/*.sh (--prompt_param 100 8 0.0) and configs/*_prompt.yaml."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.method == 'coda' and config.dataset == dataset
  assert (config.continual.num_tasks, config.continual.num_classes_per_task) == (10, per_task)
  param = config.coda_prompt_param
  assert (param.pool_size, param.length, tuple(param.layer_idx), param.ortho_mu) == (100, 8, (0, 1, 2, 3, 4), 0.0)
  assert config.optim == 'adam' and config.weight_decay == 0.0 and config.num_epochs == epochs
  # Adam at 0.001 for the official global batch of 128 (8 devices x 16 here).
  assert config.per_device_batch_size * 8 == 128 and config.learning_rate * 128 / 256 == 0.001
  assert config.learning_rate_schedule == 'coda_cosine' and config.vit_classifier == 'token'
  assert config.grad_clip_max_norm == 0.0  # The official code does not clip.
  assert tuple(config.freeze_part) == ('encoder', 'embedding', 'cls') and config.reinit_optimizer


@pytest.mark.parametrize('field,value', [('reinit_optimizer', False), ('weight_decay', 1e-4)])
def test_settings_that_would_move_frozen_components_are_refused(field, value):
  config = cifar100_coda.get_config()
  config[field] = value
  with pytest.raises(ValueError, match='reinit_optimizer=True and weight_decay=0'):
    coda.CodaPrompt.from_config(config)
