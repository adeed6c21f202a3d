"""Analytic FLOPs per image of the train and eval steps of a (prompted) ViT.

Convention:
- Only matrix products count. One multiply-add is 2 FLOPs, so an [m, k] x [k, n]
  product costs 2*m*n*k. Layer norms, softmax, GELU, residual adds, the prompt
  pool's key matching ([D] x [D, pool] per image), CODA-Prompt's component
  weighting and mixing (about pool x L x (3 D + length x D) per image) and the
  optimizer update are left out; together they are well under 1% of a ViT-B/16
  step.
- Forward pass of one image with N patches of side p, width D, MLP width M:
  patch embedding 2*N*(p*p*3)*D; per block with T query tokens and S key tokens,
  q/k/v projections 3 * 2*T*D*D, scores QK^T 2*T*S*D, weighted values AV 2*T*S*D,
  output projection 2*T*D*D, MLP 2 * 2*T*D*M; head 2*D*C.
  Prompt-tuning prompts are prepended to the input of their block, so T grows
  from that block on; prefix prompts add their length to S of their block only.
  Every token goes through every block, as the step computes it, even tokens
  the classifier does not read.
- The query pass is a forward pass of the same backbone without prompts and
  without head (its logits are unused, so the compiler drops that product).
  It runs under stop_gradient: no backward.
- Backward pass: a product costs 2x its forward, one product per operand
  gradient. For a product with a weight matrix that is 1x for the activation
  gradient and 1x for the weight gradient; in QK^T and AV both operands are
  activations, so both products are activation gradients. Hence
    backward_activations = the forward products of the blocks that need
                           activation gradients + their QK^T and AV again
                           + the head's input gradient,
    backward weight gradients = the forward weight products (of the
                           differentiated weights),
  which together make exactly 2x the forward when every block and weight is
  differentiated, minus the patch embedding's input gradient (the images are
  not differentiated).
- Which gradients exist depends on the clipping mode. 'full' differentiates
  every parameter, so all blocks need activation gradients and every frozen
  weight gets a weight gradient (`backward_frozen_weights`). 'trainable'
  differentiates the trainable parameters only: activation gradients run from
  the first block that holds a trainable parameter or receives a prompt, and
  frozen weights get none. That first block needs no input gradient (its q/k/v
  projections' activation product) unless prompt tokens enter its input, and,
  when it only receives prefixes, no query gradient of QK^T either.
"""

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from libml import steps

# Names of the matrix-product weights, as in the parameter tree.
EMBEDDING = "embedding/kernel"
HEAD = "head/kernel"
# Parameters that act before block 0: differentiating any of them needs every block's backward.
INPUT_PARAMS = (EMBEDDING, "cls", "Transformer/posembed_input/pos_embedding")
BLOCK = "Transformer/encoderblock_{}/"


@dataclasses.dataclass(frozen=True)
class PromptLayout:
  """Prompt tokens that enter each block.

  Attributes:
    tokens: per block, prompt-tuning tokens prepended to its input (they stay
      in the sequence of every later block).
    prefix: per block, prefix key/value tokens added to its attention keys.
  """
  tokens: tuple[int, ...]
  prefix: tuple[int, ...]

  @property
  def first_prompted_block(self) -> Optional[int]:
    """Index of the first block that receives any prompt, None without prompts."""
    blocks = [i for i, (t, p) in enumerate(zip(self.tokens, self.prefix)) if t or p]
    return blocks[0] if blocks else None


class _MethodHost(nn.Module):
  """Runs a prompt method's `prompts` inside a compact call, as the model does."""
  method: object
  dims: object

  @nn.compact
  def __call__(self, x_embed, cls_features, task):
    return self.method.prompts(x_embed, cls_features, task, None, False, self.dims)


def prompt_layout(model) -> PromptLayout:
  """Per-block prompt lengths of a `models.prompted_vit.PromptedViT`.

  Read from the shapes of what the model's prompt method hands each block (traced, nothing
  computed): its prompt tokens [B, P, D] and key/value prefixes [B, 2, P, H, hd].
  """
  tokens = [0] * model.num_layers
  prefix = [0] * model.num_layers
  if model.method is not None:
    width = model.hidden_size
    task = model.method.task_arrays(0, steps_per_epoch=1, num_steps=1)
    host = _MethodHost(model.method, model.dims)
    shapes, _ = jax.eval_shape(
        lambda: host.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 1, width)), jnp.zeros((1, width)),
                                      task))
    for i, (t, p) in enumerate(zip(shapes.tokens, shapes.prefixes)):
      tokens[i] = t.shape[1] if t is not None else 0
      prefix[i] = p.shape[2] if p is not None else 0
  return PromptLayout(tokens=tuple(tokens), prefix=tuple(prefix))


def block_flops(tokens: int, keys: int, width: int, mlp_dim: int) -> dict[str, int]:
  """Forward FLOPs of one Transformer block on T=`tokens` queries and S=`keys` keys."""
  return {
      "qkv": 3 * 2 * tokens * width * width,
      "scores": 2 * tokens * keys * width,
      "values": 2 * tokens * keys * width,
      "out": 2 * tokens * width * width,
      "mlp": 2 * 2 * tokens * width * mlp_dim,
  }


# Products inside a block whose second operand is an activation, not a weight.
ATTENTION_PRODUCTS = ("scores", "values")


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
  """Forward FLOPs of one image, by component.

  Attributes:
    embedding: patch-embedding product.
    blocks: per block, `block_flops` of that block.
    head: classifier product (0 when the head's output is unused).
  """
  embedding: int
  blocks: tuple[dict[str, int], ...]
  head: int

  @property
  def total(self) -> int:
    return self.embedding + sum(sum(b.values()) for b in self.blocks) + self.head


def forward_flops(model, input_size: int, *, head: bool = True) -> ForwardFlops:
  """Forward FLOPs per image of `model` (a PromptedViT) on input_size^2 images.

  Args:
    model: the PromptedViT (its dimension and prompt fields are read).
    input_size: image side in pixels; must divide by the patch size.
    head: count the classifier product.
  """
  p, width = model.patch_size, model.hidden_size
  if input_size % p:
    raise ValueError(f"input_size {input_size} is not a multiple of the patch size {p}")
  patches = (input_size // p) ** 2
  layout = prompt_layout(model)
  seq = patches + int(model.use_cls_token)
  blocks = []
  for i in range(model.num_layers):
    seq += layout.tokens[i]
    blocks.append(block_flops(seq, seq + layout.prefix[i], width, model.mlp_dim))
  return ForwardFlops(embedding=2 * patches * (p * p * 3) * width, blocks=tuple(blocks),
                      head=2 * width * model.num_classes if head else 0)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs per image of one train step, by component, and of the eval steps.

  Attributes:
    query_forward: forward of the frozen query ViT (0 when no query is needed).
    prompted_forward: forward of the prompted model.
    backward_activations: activation gradients.
    backward_trainable_weights: weight gradients of trainable matrix weights.
    backward_frozen_weights: weight gradients of frozen matrix weights (only
      computed by clip mode 'full').
  """
  query_forward: int
  prompted_forward: int
  backward_activations: int
  backward_trainable_weights: int
  backward_frozen_weights: int

  @property
  def train(self) -> int:
    return sum(dataclasses.asdict(self).values())

  @property
  def eval_cached_query(self) -> int:
    """Eval step whose batch carries the query features: the prompted pass only."""
    return self.prompted_forward

  @property
  def eval_with_query(self) -> int:
    return self.query_forward + self.prompted_forward

  def as_dict(self) -> dict[str, int]:
    return {**dataclasses.asdict(self), "train_total": self.train,
            "eval_cached_query_total": self.eval_cached_query,
            "eval_with_query_total": self.eval_with_query}


def _is_frozen(path: str, freeze_part: Sequence[str]) -> bool:
  return any(part in path for part in freeze_part)


def step_flops(model, input_size: int, *, query_model=None, clip_mode: str,
               freeze_part: Sequence[str]) -> StepFlops:
  """FLOPs per image of the train step (see the module docstring for the convention).

  Args:
    model: the prompted PromptedViT.
    input_size: image side in pixels.
    query_model: the query PromptedViT, or None when the step runs no query pass.
    clip_mode: 'full' or 'trainable', as `libml.steps.StepOptions.clip_mode`.
    freeze_part: substrings of frozen parameter paths (config.freeze_part).
  """
  if clip_mode not in steps.GRAD_CLIP_MODES:
    raise ValueError(f"clip_mode must be one of {steps.GRAD_CLIP_MODES}, got {clip_mode!r}")
  fwd = forward_flops(model, input_size)
  query = forward_flops(query_model, input_size, head=False).total if query_model is not None else 0
  full = clip_mode == "full"
  # Weight products by parameter path; a block's four projections and MLP share its path prefix.
  weights = [(EMBEDDING, fwd.embedding), (HEAD, fwd.head)]
  weights += [(BLOCK.format(i), sum(v for k, v in b.items() if k not in ATTENTION_PRODUCTS))
              for i, b in enumerate(fwd.blocks)]
  trainable_w = sum(f for path, f in weights if not _is_frozen(path, freeze_part))
  frozen_w = sum(f for path, f in weights if _is_frozen(path, freeze_part)) if full else 0

  # Activation gradients run back to the first block at or after which something is
  # differentiated; in 'full' that is the patch embedding, before block 0.
  layout = prompt_layout(model)
  trainable_blocks = [i for i in range(model.num_layers) if not _is_frozen(BLOCK.format(i), freeze_part)]
  starts = [i for i in (layout.first_prompted_block, *trainable_blocks[:1]) if i is not None]
  inputs_differentiated = full or not all(_is_frozen(path, freeze_part) for path in INPUT_PARAMS)
  first = 0 if inputs_differentiated else min(starts, default=model.num_layers)
  activations = fwd.head + sum(sum(b.values()) + sum(b[k] for k in ATTENTION_PRODUCTS)
                               for b in fwd.blocks[first:])
  if not inputs_differentiated and first < model.num_layers and not layout.tokens[first]:
    # Nothing differentiated enters the first block's input: no input gradient (the
    # activation product of its q/k/v projections); with prefixes only, no query gradient.
    activations -= fwd.blocks[first]["qkv"]
    if first not in trainable_blocks:
      activations -= fwd.blocks[first]["scores"]
  return StepFlops(query_forward=query, prompted_forward=fwd.total,
                   backward_activations=activations, backward_trainable_weights=trainable_w,
                   backward_frozen_weights=frozen_w)
