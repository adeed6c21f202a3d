r"""Pretrains the embedded demo's ViT on rendered glyphs and writes it as a ViT release `.npz`.

  python -m demo.pretrain_vit --out demo/ViT-demo_glyphs.npz

`ViT-demo` (width 64, 4x4 patches, 6 blocks, 4 heads, MLP 256) learns to name 72 letters and
symbols drawn from matplotlib's fonts (`demo/glyphs.py`; no digit), shown as the digits
benchmark shows its images: 8x8 integers 0..16, resized bilinearly to 16x16, truncated to
integers and scaled to [0, 1], grey to RGB. The file holds the backbone and the glyph head in
the layout of the original ViT release, so `--my_config.init_checkpoint` loads it like
`ViT-B_16.npz`. The script is seeded: same libraries, same file. About 12 minutes on 2 CPU
cores; it prints held-out glyph accuracy and a linear probe of its frozen features on the
digits (scikit-learn's logistic regression on the class token).
"""

import argparse
import time

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from demo import glyphs
from models import vit
from models.prompted_vit import PromptedViT

MODEL_NAME = 'ViT-demo'
INPUT_SIZE = 16
DIGITS_MAX = 16.0


def to_inputs(images: jax.Array) -> jax.Array:
  """uint8 [B, 8, 8] on the digits' 0..16 scale -> float32 [B, 16, 16, 3] as the benchmark's."""
  x = images.astype(jnp.float32)[..., None]
  x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 1), 'bilinear')
  x = jnp.floor(jnp.clip(x, 0.0, DIGITS_MAX)) / DIGITS_MAX
  return jnp.repeat(x, 3, axis=-1)


def make_model(num_classes: int) -> PromptedViT:
  v = vit.get_variant(MODEL_NAME)
  return PromptedViT(hidden_size=v.hidden_size, patch_size=v.patch_size,
                     num_layers=v.num_layers, num_heads=v.num_heads, mlp_dim=v.mlp_dim,
                     num_classes=num_classes, classifier='token')


def train(args) -> tuple[PromptedViT, dict]:
  """Returns the model and its trained parameters; prints progress."""
  bank = glyphs.draw_glyphs()
  num_classes = len(glyphs.CHARACTERS)
  t0 = time.time()
  train_x, train_y = glyphs.make_dataset(bank, args.num_train, seed=args.seed)
  test_x, test_y = glyphs.make_dataset(bank, args.num_test, seed=args.seed + 1)
  print(f'rendered {len(train_x)} + {len(test_x)} glyph images of {num_classes} classes '
        f'from {len(glyphs.FONTS)} fonts in {time.time() - t0:.0f} s', flush=True)

  model = make_model(num_classes)
  params = model.init(jax.random.PRNGKey(args.seed),
                      jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))['params']
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup_steps, args.steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=args.weight_decay))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits, _ = model.apply({'params': p}, to_inputs(images), train=True)
      targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), 0.1)
      return optax.softmax_cross_entropy(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(args.seed)
  order = np.empty(0, np.int64)
  t0 = time.time()
  for i in range(1, args.steps + 1):
    if len(order) < args.batch_size:
      order = np.concatenate([order, rng.permutation(len(train_x))])
    idx, order = order[:args.batch_size], order[args.batch_size:]
    params, opt_state, loss = step(params, opt_state, train_x[idx], train_y[idx])
    if i % 250 == 0 or i == args.steps:
      rate = i / (time.time() - t0)
      print(f'step {i}/{args.steps}  loss {float(loss):.3f}  {rate:.1f} steps/s  '
            f'ETA {(args.steps - i) / rate / 60:.1f} min', flush=True)
  acc = np.mean(np.argmax(predict(model, params, test_x), -1) == test_y)
  print(f'held-out glyph accuracy {100 * acc:.1f}%', flush=True)
  return model, params


def feature_fn(model: PromptedViT):
  """Jitted (params, uint8 [B, 8, 8]) -> (logits [B, C], class-token pre-logits [B, 64])."""
  @jax.jit
  def features(params, images):
    logits, aux = model.apply({'params': params}, to_inputs(images))
    return logits, aux['pre_logits']
  return features


def predict(model, params, images, batch: int = 1024) -> np.ndarray:
  """Logits [N, C] of uint8 [N, 8, 8] images, `batch` at a time."""
  fn = feature_fn(model)
  return np.concatenate([np.asarray(fn(params, images[i:i + batch])[0])
                         for i in range(0, len(images), batch)])


def digits_probe(model, params) -> float:
  """Test accuracy of a logistic regression on the frozen class-token features of the digits."""
  # Imported here: only the probe needs them.
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from libml import record_sources  # pylint: disable=g-import-not-at-top
  fn = feature_fn(model)
  split = record_sources.digits_splits()
  feats = {}
  for name in ('train', 'test'):
    _, images, labels = split[name]
    x = np.asarray(images[..., 0]).astype(np.uint8)
    feats[name] = (np.asarray(fn(params, x)[1]), labels)
  probe = LogisticRegression(max_iter=2000).fit(*feats['train'])
  return float(probe.score(*feats['test']))


def save_npz(path: str, params) -> None:
  """Writes `params` as the ViT release does: one array per slash-joined Flax path."""
  flat = {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  with open(path, 'wb') as f:
    np.savez(f, **flat)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='demo/ViT-demo_glyphs.npz')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--steps', type=int, default=3600)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--warmup_steps', type=int, default=200)
  parser.add_argument('--weight_decay', type=float, default=0.05)
  parser.add_argument('--num_train', type=int, default=200_000)
  parser.add_argument('--num_test', type=int, default=5_000)
  args = parser.parse_args()
  model, params = train(args)
  print(f'digits linear probe (frozen features) {100 * digits_probe(model, params):.1f}%',
        flush=True)
  save_npz(args.out, params)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
