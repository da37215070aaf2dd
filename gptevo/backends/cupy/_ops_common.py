"""Constants and small helpers shared by the cupy backend's op modules (``_ops.py``, ``_ops_moe.py``)."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from gptevo.errors import RequestError
from gptevo.ops import REGISTRY

# The reference's bodies (no checks), for the few ops and inputs this backend runs on the host.
REFERENCE = {name: spec.kernel for name, spec in REGISTRY.items() if spec.backend_op}

SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
WEIGHT_KIND = {np.dtype(np.float32): "f32w", np.dtype(np.float64): "f64w", np.dtype(np.float16): "f16w",
               np.dtype(ml_dtypes.bfloat16): "bf16w"}
RAW_VIEW = {"f32w": np.float32, "f64w": np.float64, "f16w": np.uint16, "bf16w": np.uint16}
RAW_TAG = {kind: f"raw:{np.dtype(raw).name}" for kind, raw in RAW_VIEW.items()}   # weight-cache tags
LINEAR_ROWS_PER_BLOCK = 4        # warps per block in grouped_linear (one output row each)
LINEAR_TOK = 4                   # pairs per warp (LIN_TOK in linear.cu)
MAX_GRID_Y = 65535
MAX_INT32 = 2**31 - 1
SHARED_LIMIT = 48 * 1024
ATTN_MAX_GROUP = 8               # attention.cu split-K kernel limits (ATTN_MAX_GROUP, ATTN_MAX_DH)
ATTN_MAX_DH = 128
ATTN_SPLIT_KEYS = 256            # keys per split (at least)
ATTN_MAX_SPLITS = 64
ATTN_SPLIT_THREADS = 128         # 32 * ATTN_SPLIT_WARPS
MAX_ROUTE_K = 32                 # moe.cu ROUTE_MAX_K
SAMPLE_THREADS = 1024            # sampling.cu SAMPLE_MAX_THREADS


def _i32(value: int, what: str) -> np.int32:
    if value > MAX_INT32:
        raise RequestError(f"{what} = {value} exceeds the CUDA kernels' 32-bit limit ({MAX_INT32})")
    return np.int32(value)


def _reduce_block(n: int) -> int:
    """Threads for a one-block-per-row reduction over n elements (a multiple of 32)."""
    return 32 if n <= 64 else 128 if n <= 2048 else 256
