"""Loading pretrained ViT weights into a PromptedViT parameter tree.

Two file formats are read, told apart by their content rather than their name:

* the original ViT release `.npz` (e.g.
  gs://vit_models/imagenet21k/ViT-B_16.npz): a zip of arrays keyed by
  slash-joined Flax paths, in some files all under `opt/target/`. Blocks
  use either the pre-Linen names the model keeps (`LayerNorm_0`,
  `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`) or Linen's
  automatic names (`LayerNorm_0`, `MultiHeadDotProductAttention_0`,
  `LayerNorm_1`, `MlpBlock_0`), which are mapped onto the former.
* timm's `.safetensors` (e.g. `vit_base_patch16_224.orig_in21k`, the same
  ImageNet-21k weights): PyTorch layouts (linear weights [out, in], fused
  q/k/v rows, OIHW patch convolution) are converted to the Flax ones.

Only the backbone (`embedding`, `cls`, `Transformer/...`) comes from the file.
The file's `head` and `pre_logits` are dropped; every other model parameter
(prompts, prompt keys, the head) keeps its initial value.
"""

from collections.abc import Mapping
import math
import os
import re
import struct
from typing import Any
import zipfile
import zlib

from absl import logging
import numpy as np
import safetensors
import safetensors.numpy

from libml.errors import UserError
from libml.pos_embedding import resize_pos_embedding

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # first entry / empty archive
_TARGET_PREFIX = "opt/target/"
_BACKBONE_ROOTS = ("embedding", "cls", "Transformer")
_DROPPED_ROOTS = ("head", "pre_logits")
_POS_EMBEDDING = "Transformer/posembed_input/pos_embedding"
_ATTENTION = "MultiHeadDotProductAttention_1"
_LINEN_TO_MODEL = {
    "MultiHeadDotProductAttention_0": _ATTENTION,
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_WHERE_TO_GET = (
    "get gs://vit_models/imagenet21k/ViT-B_16.npz or, as that bucket refuses "
    "anonymous downloads, model.safetensors of timm's "
    "vit_base_patch16_224.orig_in21k from the Hugging Face hub, and set "
    "--my_config.init_checkpoint=<its local path>")

# timm name -> (Flax name, whether it is a torch Linear weight [out, in]).
_TIMM_TOP = {
    "cls_token": ("cls", False),
    "pos_embed": (_POS_EMBEDDING, False),
    "patch_embed.proj.bias": ("embedding/bias", False),
    "norm.weight": ("Transformer/encoder_norm/scale", False),
    "norm.bias": ("Transformer/encoder_norm/bias", False),
    "head.weight": ("head/kernel", True),
    "head.bias": ("head/bias", False),
    "pre_logits.fc.weight": ("pre_logits/kernel", True),
    "pre_logits.fc.bias": ("pre_logits/bias", False),
}
# Same, for the part of a name after `blocks.{i}.`.
_TIMM_BLOCK = {
    "norm1.weight": ("LayerNorm_0/scale", False),
    "norm1.bias": ("LayerNorm_0/bias", False),
    "attn.proj.bias": (f"{_ATTENTION}/out/bias", False),
    "norm2.weight": ("LayerNorm_2/scale", False),
    "norm2.bias": ("LayerNorm_2/bias", False),
    "mlp.fc1.weight": ("MlpBlock_3/Dense_0/kernel", True),
    "mlp.fc1.bias": ("MlpBlock_3/Dense_0/bias", False),
    "mlp.fc2.weight": ("MlpBlock_3/Dense_1/kernel", True),
    "mlp.fc2.bias": ("MlpBlock_3/Dense_1/bias", False),
}
_TIMM_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")
_BLOCK_INDEX = re.compile(r"Transformer/encoderblock_(\d+)/")


def load_pretrained(path: str, init_params: Mapping[str, Any],
                    model_name: str) -> dict[str, Any]:
  """Returns `init_params` with its backbone replaced by a checkpoint's weights.

  Args:
    path: a ViT release `.npz`, a timm `.safetensors`, or a directory holding
      `model.safetensors`.
    init_params: the freshly initialised PromptedViT parameter tree (nested
      dicts of arrays), e.g. `embedding/kernel` [p, p, 3, D],
      `Transformer/posembed_input/pos_embedding` [1, 1 + N, D].
    model_name: the configured ViT variant, named in error messages.

  Returns:
    A nested dict with the structure of `init_params`. Backbone leaves are
    numpy arrays of the init leaf's dtype holding the file's values, the
    position embedding resized to the model's patch grid when it differs; all
    other leaves are those of `init_params`.

  Raises:
    UserError: the file is missing, of an unknown format, damaged, or does not
      fit `model_name`.
  """
  flat_init = _flatten(init_params)
  query = f"Transformer/encoderblock_0/{_ATTENTION}/query/kernel"
  num_heads = flat_init[query].shape[1] if query in flat_init else 1
  flat_file, fmt = read_checkpoint(path, num_heads=num_heads)
  backbone = sorted(
      (k for k in flat_init if k.split("/")[0] in _BACKBONE_ROOTS),
      key=_check_order)
  _check_fits(flat_file, flat_init, backbone, path, model_name, fmt)

  merged = dict(flat_init)
  for key in backbone:
    value = flat_file[key]
    want = flat_init[key].shape
    if key == _POS_EMBEDDING and value.shape != want:
      old, new = math.isqrt(value.shape[1] - 1), math.isqrt(want[1] - 1)
      value = resize_pos_embedding(value, want[1])
      logging.info("Resized %s from a %dx%d to a %dx%d patch grid (bilinear, "
                   "corners aligned).", key, old, old, new, new)
    merged[key] = np.array(value, dtype=flat_init[key].dtype)

  fresh = [k for k in flat_init if k not in backbone]
  dropped = [k for k in flat_file if k.split("/")[0] in _DROPPED_ROOTS]
  unused = [k for k in flat_file
            if k not in merged and k.split("/")[0] not in _DROPPED_ROOTS]
  logging.info("Loaded %d backbone arrays from %s (%s).", len(backbone), path,
               fmt)
  logging.info("Kept as initialised: %s.", ", ".join(fresh) or "nothing")
  logging.info("Dropped from the checkpoint: %s.",
               ", ".join(dropped) or "nothing")
  if unused:
    logging.warning("Ignored %d checkpoint arrays the model has no place for: "
                    "%s.", len(unused), ", ".join(unused))
  return _unflatten(merged)


def read_checkpoint(path: str, *,
                    num_heads: int) -> tuple[dict[str, np.ndarray], str]:
  """Reads a checkpoint into flat arrays named as in the ViT release `.npz`.

  Args:
    path: a `.npz` or `.safetensors` file, or a directory holding
      `model.safetensors`.
    num_heads: attention heads to split timm's fused [3D, D] q/k/v weights
      into (the `.npz` stores them split already).

  Returns:
    ({'embedding/kernel': [p, p, 3, D], ..., 'Transformer/encoderblock_0/
    MultiHeadDotProductAttention_1/query/kernel': [D, H, D/H], ...}, format)
    with format 'npz' or 'safetensors'. Keys carry no `opt/target/` prefix
    and use the pre-Linen block names.
  """
  path = _existing_file(path)
  with open(path, "rb") as f:
    start = f.read(9)
  if start.startswith(_ZIP_MAGIC):
    return _from_npz(_read_npz(path)), "npz"
  if len(start) == 9 and start[8:9] == b"{":  # u64 header length, JSON
    raw = _read_safetensors(path)
    if "patch_embed.proj.weight" not in raw:
      raise UserError(
          f"init_checkpoint {path!r} holds no patch_embed.proj.weight, so "
          f"it is not a timm ViT; {_WHERE_TO_GET}")
    return _from_timm(raw, num_heads), "safetensors"
  raise UserError(
      f"init_checkpoint {path!r} is neither a .npz (zip) nor a .safetensors "
      f"file; {_WHERE_TO_GET}")


def _existing_file(path: str) -> str:
  """Returns the file to read for `path`, or raises UserError."""
  if "://" in path:
    raise UserError(
        f"init_checkpoint {path!r} is a URL; copy the file to a local disk "
        "(e.g. gsutil cp) and set --my_config.init_checkpoint to the copy")
  if os.path.isdir(path):
    inner = os.path.join(path, "model.safetensors")
    if os.path.isfile(inner):
      return inner
    raise UserError(
        f"init_checkpoint {path!r} is a directory without model.safetensors; "
        "set --my_config.init_checkpoint to the .npz or .safetensors file")
  if not os.path.isfile(path):
    raise UserError(f"init_checkpoint {path!r} does not exist; {_WHERE_TO_GET}")
  return path


def _damaged(path: str, fmt: str, err: Exception) -> UserError:
  reason = (str(err).splitlines() or [""])[0]
  return UserError(
      f"init_checkpoint {path!r} is a truncated or corrupt {fmt} file "
      f"({type(err).__name__}: {reason}); download it again")


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as e:
    raise _damaged(path, ".npz", e) from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
  if 8 + header_len > size:
    raise _damaged(path, ".safetensors",
                   EOFError(f"header of {header_len} bytes, file of {size}"))
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, ValueError, OSError) as e:
    raise _damaged(path, ".safetensors", e) from e


def _from_npz(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips `opt/target/` and maps Linen auto-names onto pre-Linen ones."""
  if any(k.startswith(_TARGET_PREFIX) for k in raw):
    # Training checkpoints also hold optimizer state (`opt/state/...`).
    raw = {k[len(_TARGET_PREFIX):]: v for k, v in raw.items()
           if k.startswith(_TARGET_PREFIX)}
  linen_only = ("MultiHeadDotProductAttention_0", "MlpBlock_0")
  linen = any(_block_child(k) in linen_only for k in raw)
  if not linen:
    return raw
  out = {}
  for key, value in raw.items():
    parts = key.split("/")
    if _block_child(key) in _LINEN_TO_MODEL:
      parts[2] = _LINEN_TO_MODEL[parts[2]]
    out["/".join(parts)] = value
  return out


def _block_child(key: str) -> str | None:
  """'Transformer/encoderblock_3/MlpBlock_0/...' -> 'MlpBlock_0', else None."""
  parts = key.split("/")
  if len(parts) > 2 and _BLOCK_INDEX.match(key):
    return parts[2]
  return None


def _from_timm(raw: dict[str, np.ndarray],
               num_heads: int) -> dict[str, np.ndarray]:
  """Renames and re-lays timm ViT arrays as in the ViT release `.npz`."""
  hidden = raw["patch_embed.proj.weight"].shape[0]
  if hidden % num_heads:
    num_heads = 1  # The file is of another width; the shape check reports it.
  out = {}
  for name, value in raw.items():
    if name == "patch_embed.proj.weight":
      out["embedding/kernel"] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      continue
    match = _TIMM_BLOCK_NAME.fullmatch(name)
    converted = match and _timm_block_arrays(match.group(2), value, num_heads)
    if converted:
      prefix = f"Transformer/encoderblock_{match.group(1)}/"
      out.update({prefix + k: v for k, v in converted.items()})
    elif name in _TIMM_TOP:
      new_name, is_linear = _TIMM_TOP[name]
      out[new_name] = value.T if is_linear else value
    else:
      out[name] = value  # Unknown to the model: reported as ignored.
  return out


def _timm_block_arrays(suffix: str, value: np.ndarray,
                       num_heads: int) -> dict[str, np.ndarray] | None:
  """Converts one array of a timm block, named by what follows `blocks.{i}.`.

  Returns None for arrays the model has no place for (e.g. layer scales).
  """
  if suffix == "attn.qkv.weight":  # [3D, D]: rows of q, then k, then v.
    hidden = value.shape[1]
    return {f"{_ATTENTION}/{name}/kernel": w.T.reshape(hidden, num_heads, -1)
            for name, w in zip(("query", "key", "value"), np.split(value, 3))}
  if suffix == "attn.qkv.bias":  # [3D]
    return {f"{_ATTENTION}/{name}/bias": b.reshape(num_heads, -1)
            for name, b in zip(("query", "key", "value"), np.split(value, 3))}
  if suffix == "attn.proj.weight":  # [D, D] -> [H, D/H, D]
    return {f"{_ATTENTION}/out/kernel":
                value.T.reshape(num_heads, -1, value.shape[0])}
  if suffix in _TIMM_BLOCK:
    new_name, is_linear = _TIMM_BLOCK[suffix]
    return {new_name: value.T if is_linear else value}
  return None


def _check_fits(flat_file: dict[str, np.ndarray], flat_init: dict[str, Any],
                backbone: list[str], path: str, model_name: str,
                fmt: str) -> None:
  """Raises UserError unless the file has each backbone array, shaped to fit."""
  for key in backbone:
    if key not in flat_file:
      continue
    got, want = tuple(flat_file[key].shape), tuple(flat_init[key].shape)
    if key == _POS_EMBEDDING:  # Only the number of positions may differ.
      fits = len(got) == 3 and got[0] == 1 and got[2] == want[2]
    else:
      fits = got == want
    if not fits:
      raise UserError(
          f"init_checkpoint {path!r} does not fit model_name {model_name!r}: "
          f"{key} has shape {got} in the file but {want} in the model; "
          f"{_fitting_model(flat_file, fmt)}")
  file_depth, model_depth = _depth(flat_file), _depth(flat_init)
  if file_depth != model_depth:
    raise UserError(
        f"init_checkpoint {path!r} has {file_depth} Transformer blocks but "
        f"model_name {model_name!r} has {model_depth}; "
        f"{_fitting_model(flat_file, fmt)}")
  missing = [k for k in backbone if k not in flat_file]
  if missing:
    raise UserError(
        f"init_checkpoint {path!r} lacks {len(missing)} backbone arrays of "
        f"model_name {model_name!r}, the first being {missing[0]}; it is not a "
        f"complete ViT checkpoint: {_WHERE_TO_GET}")


def _fitting_model(flat_file: dict[str, np.ndarray], fmt: str) -> str:
  """Names the ViT variant the file's shapes fit, as advice for an error."""
  kernel = flat_file.get("embedding/kernel")
  mlp = flat_file.get("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel")
  query = flat_file.get(f"Transformer/encoderblock_0/{_ATTENTION}/query/kernel")
  if kernel is None or kernel.ndim != 4 or mlp is None or mlp.ndim != 2:
    return "the file does not look like a ViT checkpoint"
  dims = dict(hidden_size=kernel.shape[3], patch_size=kernel.shape[0],
              num_layers=_depth(flat_file), mlp_dim=mlp.shape[1])
  # timm files do not record the head count; the release .npz does.
  if fmt == "npz" and query is not None and query.ndim == 3:
    dims["num_heads"] = query.shape[1]
  from models import vit  # pylint: disable=g-import-not-at-top
  for name, variant in vit.VARIANTS.items():
    if all(getattr(variant, field) == value for field, value in dims.items()):
      return f"the file fits model_name {name!r}: set config.model_name to it"
  found = ", ".join(f"{k} {v}" for k, v in dims.items())
  return f"no model_name in models.vit.VARIANTS fits the file ({found})"


def _depth(flat: Mapping[str, Any]) -> int:
  """Number of Transformer blocks: 1 + the highest encoderblock index."""
  indices = [int(m.group(1)) for m in map(_BLOCK_INDEX.match, flat) if m]
  return max(indices, default=-1) + 1


def _check_order(key: str) -> tuple[int, int, bool]:
  """Embedding, cls, position embedding, blocks by index, final norm.

  Within each, kernels come first: their shapes say the most in an error.
  Used with a stable sort.
  """
  root = _BACKBONE_ROOTS.index(key.split("/")[0])
  match = _BLOCK_INDEX.match(key)
  if match:
    position = int(match.group(1))
  else:
    position = -1 if "posembed" in key else 1 << 30
  return root, position, not key.endswith("/kernel")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{name}/"))
    else:
      out[f"{prefix}{name}"] = value
  return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree
