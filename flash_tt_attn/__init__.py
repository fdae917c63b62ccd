"""flash_tt_attn: fused triangle attention (AlphaFold-style, with pair bias) in Triton."""

from . import _compat  # noqa: F401  (refuses torch/triton older than the tested minimums)
from ._version import __version__
from .api import attention
from .modules import TriangleAttention, TriangleAttentionReference

__all__ = ["__version__", "attention", "TriangleAttention", "TriangleAttentionReference"]
