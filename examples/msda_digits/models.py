"""A small Deformable DETR for canvases of four digits, and the same model with dense attention.

The model follows Deformable DETR (Zhu et al., 2020, https://arxiv.org/abs/2010.04159) with
iterative box refinement, scaled down: a convnet gives three feature levels, each projected to
``d_model`` channels (1 x 1 convolution and GroupNorm) and flattened; sine positions plus a
learned embedding per level locate every token. One encoder layer runs self-attention over the
tokens of all levels; two decoder layers run self-attention among the learned queries and
cross-attention from the queries into the encoder's tokens, each followed by an FFN (post-norm,
as in Deformable DETR). After every decoder layer a class head and a box head predict each
query's digit and box; the box head refines the layer's reference box (in logit space), and the
refined box, with its gradient stopped, is the next layer's reference box.

``attention="msda"`` uses :class:`flaxdcn.MSDeformAttn` for the encoder's self-attention
(2-d reference points: the centres of the tokens' cells, on every level) and for the decoder's
cross-attention (4-d reference boxes ``(cx, cy, w, h)``: the sampling offsets are scaled by the
box). ``attention="dense"`` is the baseline: :class:`flax.linen.MultiHeadDotProductAttention`
over all tokens of all levels in both places (keys carry the positions, as in DETR), so the
reference boxes only anchor the box predictions. Everything else is the same module, with the
same parameter names outside the attention layers.

Boxes are ``(cx, cy, w, h)`` normalised by the canvas size; :func:`box_cxcywh_to_xyxy` and
:func:`box_iou` convert and compare them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import flaxdcn

ATTENTIONS = ("msda", "dense")


# --- boxes ----------------------------------------------------------------------------------------

def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """``logit(x)``, with ``x`` clipped to ``[0, 1]`` and both sides of the ratio to ``>= eps``."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  centre, size = boxes[..., :2], boxes[..., 2:]
  return jnp.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  lo, hi = boxes[..., :2], boxes[..., 2:]
  return jnp.concatenate([(lo + hi) / 2, hi - lo], axis=-1)


def _area(boxes: jax.Array) -> jax.Array:
  size = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
  return size[..., 0] * size[..., 1]


def box_iou(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Intersection over union of matching ``(x1, y1, x2, y2)`` boxes ``[..., 4]``, and the union."""
  inter = _area(jnp.concatenate([jnp.maximum(a[..., :2], b[..., :2]),
                                 jnp.minimum(a[..., 2:], b[..., 2:])], axis=-1))
  union = _area(a) + _area(b) - inter
  return inter / jnp.maximum(union, 1e-9), union


def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """GIoU (Rezatofighi et al., 2019) of matching ``(x1, y1, x2, y2)`` boxes ``[..., 4]``."""
  iou, union = box_iou(a, b)
  hull = _area(jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]),
                                jnp.maximum(a[..., 2:], b[..., 2:])], axis=-1))
  return iou - (hull - union) / jnp.maximum(hull, 1e-9)


# --- positions and reference points ---------------------------------------------------------------

def sine_position_embedding(height: int, width: int, features: int,
                            temperature: float = 10000.0) -> np.ndarray:
  """Deformable DETR's ``PositionEmbeddingSine(normalize=True)`` of an unpadded map, ``[H * W, C]``.

  Row ``i`` and column ``j`` become ``(i + 0.5) / H * 2 pi`` and ``(j + 0.5) / W * 2 pi``; each is
  encoded by ``C / 2`` interleaved sines and cosines of geometrically spaced frequencies, and
  the ``y`` features come first.
  """
  if features % 4:
    raise ValueError(f"features ({features}) must be divisible by 4.")
  num = features // 2
  eps, scale = 1e-6, 2 * math.pi
  y = (np.arange(1, height + 1, dtype=np.float64) - 0.5) / (height + eps) * scale
  x = (np.arange(1, width + 1, dtype=np.float64) - 0.5) / (width + eps) * scale
  dim_t = temperature ** (2 * (np.arange(num) // 2) / num)

  def encode(values):
    angles = values[:, None] / dim_t
    return np.stack([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], -1).reshape(len(values),
                                                                                     num)

  pos_y = np.broadcast_to(encode(y)[:, None], (height, width, num))
  pos_x = np.broadcast_to(encode(x)[None, :], (height, width, num))
  return np.concatenate([pos_y, pos_x], -1).reshape(height * width, features).astype(np.float32)


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> np.ndarray:
  """Every token's cell centre ``(x, y)`` in ``[0, 1]``, the same on each level: ``[S, L, 2]``.

  Deformable DETR's ``get_reference_points`` with all valid ratios 1 (no padding).
  """
  points = []
  for h, w in spatial_shapes:
    y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    points.append(np.stack([x.ravel(), y.ravel()], -1))
  points = np.concatenate(points).astype(np.float32)
  return np.repeat(points[:, None], len(spatial_shapes), axis=1)


# --- layers ---------------------------------------------------------------------------------------

class Backbone(nn.Module):
  """Stages of two 3 x 3 convolutions with ReLU, the first of each with stride 2; returns the
  last ``num_levels`` stages' outputs (finest first)."""

  features: Sequence[int] = (16, 32, 64, 64)
  num_levels: int = 3

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    x, outputs = images, []
    for i, features in enumerate(self.features):
      x = nn.relu(nn.Conv(features, (3, 3), strides=2, name=f"stage{i}_conv0")(x))
      x = nn.relu(nn.Conv(features, (3, 3), name=f"stage{i}_conv1")(x))
      outputs.append(x)
    return outputs[-self.num_levels:]


class FFN(nn.Module):
  """``linear2(relu(linear1(x)))`` added to ``x``, then LayerNorm."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Dense(x.shape[-1], name="linear2")(nn.relu(nn.Dense(self.hidden, name="linear1")(x)))
    return nn.LayerNorm(name="norm")(x + y)


def _dense_attention(num_heads: int, name: str) -> nn.MultiHeadDotProductAttention:
  return nn.MultiHeadDotProductAttention(num_heads=num_heads, deterministic=True, name=name)


class EncoderLayer(nn.Module):
  """Self-attention over the tokens of all levels (MSDA or dense), then an FFN."""

  attention: str
  num_heads: int
  num_levels: int
  num_points: int
  ffn_dim: int
  implementation: str | None = None

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array, reference_points: jax.Array,
               spatial_shapes: tuple[tuple[int, int], ...]) -> jax.Array:
    if self.attention == "msda":
      attn = flaxdcn.MSDeformAttn(self.num_heads, self.num_levels, self.num_points,
                                  implementation=self.implementation, name="self_attn")
      out = attn(src + pos, reference_points, src, spatial_shapes)
    else:
      out = _dense_attention(self.num_heads, "self_attn")(src + pos, src + pos, src)
    src = nn.LayerNorm(name="norm1")(src + out)
    return FFN(self.ffn_dim, name="ffn")(src)


class DecoderLayer(nn.Module):
  """Self-attention among the queries, cross-attention into the memory (MSDA on the reference
  boxes, or dense), then an FFN."""

  attention: str
  num_heads: int
  num_levels: int
  num_points: int
  ffn_dim: int
  implementation: str | None = None

  @nn.compact
  def __call__(self, tgt: jax.Array, query_pos: jax.Array, reference_boxes: jax.Array,
               memory: jax.Array, memory_pos: jax.Array,
               spatial_shapes: tuple[tuple[int, int], ...]) -> jax.Array:
    q = tgt + query_pos
    tgt = nn.LayerNorm(name="norm2")(tgt + _dense_attention(self.num_heads, "self_attn")(q, q, tgt))
    if self.attention == "msda":
      attn = flaxdcn.MSDeformAttn(self.num_heads, self.num_levels, self.num_points,
                                  implementation=self.implementation, name="cross_attn")
      levels = jnp.broadcast_to(reference_boxes[:, :, None],
                                reference_boxes.shape[:2] + (self.num_levels, 4))
      out = attn(tgt + query_pos, levels, memory, spatial_shapes)
    else:
      out = _dense_attention(self.num_heads, "cross_attn")(tgt + query_pos, memory + memory_pos,
                                                           memory)
    tgt = nn.LayerNorm(name="norm1")(tgt + out)
    return FFN(self.ffn_dim, name="ffn")(tgt)


class BoxHead(nn.Module):
  """Deformable DETR's 3-layer box MLP; its last layer starts at zero (no refinement)."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.hidden, name="layers_0")(x))
    x = nn.relu(nn.Dense(self.hidden, name="layers_1")(x))
    return nn.Dense(4, kernel_init=nn.initializers.zeros, name="layers_2")(x)


class DigitDETR(nn.Module):
  """Deformable DETR with iterative box refinement, at the size of four digits on a canvas.

  Attributes:
    attention: ``"msda"`` (multi-scale deformable attention) or ``"dense"`` (the baseline).
    num_classes: classes per query.
    num_queries: learned queries; query ``i`` predicts the digit in quadrant ``i``.
    d_model: channels of every token.
    num_heads: attention heads (MSDA and dense alike).
    num_points: MSDA sampling points per head and level.
    ffn_dim: hidden width of the FFNs.
    num_encoder_layers: encoder layers.
    num_decoder_layers: decoder layers (each one predicts classes and boxes).
    backbone_features: channels of the backbone's stages (see :class:`Backbone`).
    num_levels: feature levels: the backbone's last stages.
    implementation: flaxdcn backend of MSDA (``None``, ``"xla"`` or ``"ffi"``).
  """

  attention: str = "msda"
  num_classes: int = 10
  num_queries: int = 4
  d_model: int = 64
  num_heads: int = 4
  num_points: int = 4
  ffn_dim: int = 256
  num_encoder_layers: int = 1
  num_decoder_layers: int = 2
  backbone_features: Sequence[int] = (16, 32, 64, 64)
  num_levels: int = 3
  implementation: str | None = None

  def level_shapes(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """The feature levels' ``(H_l, W_l)`` on ``height x width`` images (stride-2 stages, SAME
    padding)."""
    shapes = []
    for _ in self.backbone_features:
      height, width = -(-height // 2), -(-width // 2)
      shapes.append((height, width))
    return tuple(shapes[-self.num_levels:])

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, Any]:
    """Predictions of every decoder layer for ``images`` ``[N, H, W, 1]``.

    Returns:
      ``logits [layers, N, Q, num_classes]``, ``boxes [layers, N, Q, 4]`` (normalised
      ``(cx, cy, w, h)``) and ``reference_boxes [layers, N, Q, 4]``: the boxes the decoder
      layers attended around (the first is predicted from the queries, each later one is the
      previous layer's box).
    """
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}.")
    n, c = images.shape[0], self.d_model
    maps = Backbone(self.backbone_features, self.num_levels, name="backbone")(images)
    spatial_shapes = tuple((int(m.shape[1]), int(m.shape[2])) for m in maps)
    level_embed = self.param("level_embed", nn.initializers.normal(1.0), (self.num_levels, c))
    tokens, positions = [], []
    for level, feature_map in enumerate(maps):
      x = nn.Conv(c, (1, 1), kernel_init=nn.initializers.xavier_uniform(),
                  name=f"input_proj_{level}")(feature_map)
      x = nn.GroupNorm(num_groups=32, name=f"input_norm_{level}")(x)
      h, w = spatial_shapes[level]
      tokens.append(x.reshape(n, h * w, c))
      positions.append(sine_position_embedding(h, w, c) + level_embed[level])
    src = jnp.concatenate(tokens, axis=1)
    pos = jnp.concatenate(positions, axis=0)[None]

    enc_ref = jnp.broadcast_to(jnp.asarray(encoder_reference_points(spatial_shapes)),
                               (n,) + (src.shape[1], self.num_levels, 2))
    layer_kw = dict(attention=self.attention, num_heads=self.num_heads,
                    num_levels=self.num_levels, num_points=self.num_points,
                    ffn_dim=self.ffn_dim, implementation=self.implementation)
    for i in range(self.num_encoder_layers):
      src = EncoderLayer(**layer_kw, name=f"encoder_layer_{i}")(src, pos, enc_ref, spatial_shapes)

    query_embed = self.param("query_embed", nn.initializers.normal(1.0), (self.num_queries, 2 * c))
    query_pos = jnp.broadcast_to(query_embed[None, :, :c], (n, self.num_queries, c))
    tgt = jnp.broadcast_to(query_embed[None, :, c:], (n, self.num_queries, c))
    reference = nn.sigmoid(nn.Dense(4, kernel_init=nn.initializers.xavier_uniform(),
                                    name="reference_points")(query_pos))
    logits, boxes, references = [], [], []
    for i in range(self.num_decoder_layers):
      tgt = DecoderLayer(**layer_kw, name=f"decoder_layer_{i}")(tgt, query_pos, reference, src,
                                                                 pos, spatial_shapes)
      box = nn.sigmoid(BoxHead(c, name=f"bbox_embed_{i}")(tgt) + inverse_sigmoid(reference))
      logits.append(nn.Dense(self.num_classes, name=f"class_embed_{i}")(tgt))
      boxes.append(box)
      references.append(reference)
      reference = jax.lax.stop_gradient(box)
    return {"logits": jnp.stack(logits), "boxes": jnp.stack(boxes),
            "reference_boxes": jnp.stack(references)}
