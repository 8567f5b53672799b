"""lsr: label smoothing losses for PyTorch, exact and sparse (SparseLSR), and a benchmark of them."""

from lsr.dense import LSRLoss, dense_label_smoothing
from lsr.fused import FusedLSRLoss, FusedSparseLSRLoss, fused_label_smoothing, fused_sparse_label_smoothing
from lsr.head import LinearLSRLoss, linear_label_smoothing
from lsr.native import native_label_smoothing
from lsr.peers import liger_label_smoothing, native_compiled_label_smoothing
from lsr.reference import exact_reference, sparse_reference
from lsr.registry import REGISTRY, Implementation, available, get, register
from lsr.sparse import SparseLSRLoss, seed_snippet_sparse_lsr, sparse_label_smoothing

__version__ = "0.1.0"

__all__ = [
    "FusedLSRLoss",
    "FusedSparseLSRLoss",
    "REGISTRY",
    "Implementation",
    "LSRLoss",
    "LinearLSRLoss",
    "SparseLSRLoss",
    "available",
    "dense_label_smoothing",
    "exact_reference",
    "fused_label_smoothing",
    "fused_sparse_label_smoothing",
    "get",
    "linear_label_smoothing",
    "liger_label_smoothing",
    "native_compiled_label_smoothing",
    "native_label_smoothing",
    "register",
    "seed_snippet_sparse_lsr",
    "sparse_label_smoothing",
    "sparse_reference",
]
