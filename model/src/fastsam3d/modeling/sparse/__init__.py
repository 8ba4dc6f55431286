"""EXPERIMENTAL: the FlexAttention dense backend and 3D block-sparse ("3D sparse flash") attention.

A research option (``set_attention_backend(model, "sparse", pattern=...)``, see
docs/sparse_attention.md): the official weights were trained dense, so sparse attention needs a
student trained for it, and this API may change without notice. Modules: ``pattern``
(:class:`SparsePattern`), ``common`` (checks, the dense reference, log-sum-exp merge), ``flex``
(FlexAttention paths), ``grouped`` (the flash path), ``dispatch`` (:func:`sparse_attention`).

Both compute attention with FastSAM3D's rel-pos bias exactly as the official weights saw it
(:func:`fastsam3d.modeling.rel_pos.dense_bias`): query (qd,qh,qw), key (kd,kh,kw) get
``t_d[qd,qh,qw,kw] + t_h[qd,qh,kd,kw] + t_w[qd,qh,kh,kw]``.

The sparse pattern (:class:`SparsePattern`) is a union of *branches* ``(block, dilation)``,
LongNet's (segment, dilation) pairs carried to a 3D grid: along every axis the grid is cut into
blocks of ``block`` tokens (``0`` = the whole axis), and inside a block a token sees the tokens
whose offset from the block start agrees with its own modulo ``dilation``. So ``(4, 1)`` is
dense attention inside each 4^3 cube, ``(0, 2)`` is the stride-2 sub-grid over the whole volume.
Every branch contains the token itself. Softmax runs over the union of the branches.

Implementations (``SparsePattern.impl``), all the same function:

* ``"einsum"``: dense logits + the union mask. The reference; O(N^2) memory.
* ``"flex"``: one FlexAttention call per branch, with the tokens reordered so that the branch's
  groups are contiguous (its BlockMask is block-diagonal and really skips blocks), keys already
  covered by an earlier branch masked out (branches become disjoint), outputs merged with their
  log-sum-exp.
* ``"flex_union"``: one FlexAttention call with the union ``mask_mod``, tokens in the first
  branch's block-major order. Simpler, but a global dilated branch touches every key block, so
  the BlockMask can skip little; kept for measuring that.
* ``"flash"``: flash-attn's dense kernel on gathered groups (every group of a branch is a
  Cartesian product of per-axis coordinate sets, so gathering gives equal-length sequences). The
  rel-pos bias is folded into extra head dims and overlapping branches are combined by
  inclusion-exclusion over their intersections (which are again groups) in log-sum-exp space.
* ``"auto"``: flash on CUDA when importable and the pattern allows it, else flex on CUDA,
  else einsum (CPU).

FlexAttention has no backward on CPU: whenever autograd needs gradients on CPU, the flex paths
fall back to the einsum/SDPA computation of the same function (documented, not an error).
"""

from __future__ import annotations

from .dispatch import flash_available, resolve_impl, sparse_attention
from .flex import flex_dense
from .grouped import (
    FLASH_MAX_HEAD_DIM,
    GroupKernel,
    flash_group_kernel,
    flash_unsupported_reason,
    inclusion_exclusion,
    reference_group_kernel,
    sparse_grouped,
)
from .pattern import IMPLS, SparsePattern

EXPERIMENTAL = True

__all__ = [
    "EXPERIMENTAL",
    "FLASH_MAX_HEAD_DIM",
    "IMPLS",
    "GroupKernel",
    "SparsePattern",
    "flash_available",
    "flash_group_kernel",
    "flash_unsupported_reason",
    "flex_dense",
    "inclusion_exclusion",
    "reference_group_kernel",
    "resolve_impl",
    "sparse_attention",
    "sparse_grouped",
]
