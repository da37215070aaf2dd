"""Token embeddings and absolute/relative position signals (spec: ``spec/ops/embedding.md``).

- ``embedding``: row lookup in the token table (every family).
- ``learned_positions``: row lookup in a learned position table (GPT-2's ``wpe``).
- ``sinusoidal_positions``: the fixed sin/cos table of Vaswani et al. (2017), interleaved.
- ``alibi_slopes`` / ``alibi_bias``: the per-head linear attention bias of Press et al. (2022).
"""
from __future__ import annotations

import math
from numbers import Real

import numpy as np

from gptevo.errors import RequestError
from gptevo.ops import checks
from gptevo.ops.spec import Case, compute_dtype, op

SPEC = "spec/ops/embedding.md"


# ---------------------------------------------------------------------------------------------
# argument checks (one per op; the registry runs them before any backend's implementation)

def _check_lookup(table, ids, what: str, table_what: str, table_name: str) -> tuple:
    """(table, ids): table a real 2-D array [rows, D]; ids integers, all in [0, rows) when they are a
    NumPy array (a backend's device ids are checked on their dtype only: no transfer)."""
    table = checks.array(table)
    if len(table.shape) != 2:
        raise RequestError(f"{table_what} must be 2-D [rows, D]; found shape {tuple(table.shape)}")
    if not checks.is_real(table.dtype):
        raise RequestError(f"{table_what} has dtype {table.dtype}; expected float32, float64, float16 or bfloat16")
    ids = checks.array(ids)
    if ids.dtype.kind not in "iu":
        raise RequestError(f"{what} must be integers; found dtype {ids.dtype}")
    rows = table.shape[0]
    if checks.on_host(ids) and ids.size and not checks.all_in_range(ids, rows):
        flat = ids.reshape(-1)
        bad = np.flatnonzero((flat < 0) | (flat >= rows))
        if bad.size:
            i = int(bad[0])
            raise RequestError(f"{what}[{i}] = {int(flat[i])} is outside [0, {rows}) ({table_name} has {rows} "
                               f"rows); {bad.size} value(s) out of range")
    return table, ids


def check_embedding_args(table, ids) -> dict:
    """table real [V, D]; ids integers in [0, V)."""
    table, ids = _check_lookup(table, ids, "ids", "embedding table", "the embedding table")
    return {"table": table, "ids": ids}


def check_learned_positions_args(table, positions) -> dict:
    """table real [P, D]; positions integers in [0, P) (P = max_position_embeddings)."""
    table, positions = _check_lookup(table, positions, "positions", "position table",
                                     "the learned position table (max_position_embeddings)")
    return {"table": table, "positions": positions}


def _check_positions(p, what: str):
    """1-D integer or real positions [T]."""
    p = checks.array(p)
    if len(p.shape) != 1:
        raise RequestError(f"{what} must be 1-D [T]; found shape {tuple(p.shape)}")
    if p.dtype.kind not in "iuf":
        raise RequestError(f"{what} must be integers (or real numbers); found dtype {p.dtype}")
    return p


def check_sinusoidal_positions_args(positions, dim, base=10000.0, dtype="float32") -> dict:
    """positions [T] integer or real; dim a positive int; base a positive finite real; dtype
    "float32" or "float64" (returned as that name)."""
    positions = _check_positions(positions, "positions")
    dim = checks.positive_int(dim, "dim")
    if isinstance(base, bool) or not isinstance(base, Real) or not math.isfinite(base) or base <= 0:
        raise RequestError(f"base must be a positive finite number; found {base!r}")
    try:
        out_dtype = None if dtype is None else np.dtype(dtype)
    except TypeError:
        out_dtype = None
    if out_dtype is None or out_dtype.name not in ("float32", "float64"):
        raise RequestError(f'dtype must be "float32" or "float64"; found {dtype!r}')
    return {"positions": positions, "dim": dim, "base": float(base), "dtype": out_dtype.name}


def check_alibi_slopes_args(num_heads) -> dict:
    """num_heads a positive int."""
    return {"num_heads": checks.positive_int(num_heads, "num_heads")}


def check_alibi_bias_args(slopes, q_positions, k_positions) -> dict:
    """slopes real [H]; positions [T] and [S], integer or real."""
    slopes = checks.array(slopes)
    if len(slopes.shape) != 1 or slopes.dtype.kind not in "iuf":
        raise RequestError(f"slopes must be a 1-D real array [H]; found shape {tuple(slopes.shape)}, "
                           f"dtype {slopes.dtype}")
    return {"slopes": slopes, "q_positions": _check_positions(q_positions, "q_positions"),
            "k_positions": _check_positions(k_positions, "k_positions")}


# ---------------------------------------------------------------------------------------------
# embedding / learned_positions

def _lookup_cases(rng: np.random.Generator, index_name: str):
    import ml_dtypes

    for rows, d, t, dt, tag in [(11, 8, 1, np.float32, "f32"), (16, 13, 5, np.float32, "f32"),
                                (7, 4, 9, ml_dtypes.bfloat16, "bf16w"), (32, 16, 3, np.float16, "f16w"),
                                (9, 5, 4, np.float64, "f64")]:
        table = rng.standard_normal((rows, d)).astype(dt)
        ids = rng.integers(0, rows, size=t).astype(np.int64)
        yield Case(f"shape=[{rows},{d}],T={t},dtype={tag}", {"table": table, index_name: ids})
    # int32 ids, repeats and the last row
    table = rng.standard_normal((6, 3)).astype(np.float32)
    yield Case("shape=[6,3],T=4,ids=int32", {"table": table, index_name: np.array([5, 0, 5, 2], np.int32)})


@op("embedding",
    signature="embedding(table[V,D], ids[T] int) -> [T,D]",
    dtypes="table: f32|f64|f16|bf16; ids: any integer dtype",
    tolerance={"float32": 0.0, "float64": 0.0},
    exact=True,
    cases=lambda rng: _lookup_cases(rng, "ids"),
    source="seed 'GPT-2 Baseline Architecture' (token embeddings); GPT-2 wte / every HF family embed_tokens",
    spec_file=SPEC, check=check_embedding_args)
def embedding(table, ids):
    """Row ``ids[t]`` of the token table for each position: ``out[t] = table[ids[t]]``.

    table: [V, D] in f32/f64/f16/bf16; ids: [T] integers in [0, V) (any leading shape works).
    Returns [T, D] in the table's compute dtype (float64 stays float64, everything else float32);
    widening bf16/f16 is exact. Ids outside [0, V), negative ones included, raise RequestError.
    Family-specific scales (Gemma's sqrt(D)) are applied by the model, not here.
    """
    return table[ids].astype(compute_dtype(table))  # [T,D]


@op("learned_positions",
    signature="learned_positions(table[P,D], positions[T] int) -> [T,D]",
    dtypes="table: f32|f64|f16|bf16; positions: any integer dtype",
    tolerance={"float32": 0.0, "float64": 0.0},
    exact=True,
    cases=lambda rng: _lookup_cases(rng, "positions"),
    source="seed '2. GPT-2 (2019) - Learned Absolute Position Embeddings'; GPT-2 wpe",
    spec_file=SPEC, check=check_learned_positions_args)
def learned_positions(table, positions):
    """Row ``positions[t]`` of a learned position table (GPT-2 ``wpe``): [P, D] -> [T, D].

    Same contract as :func:`embedding`. P is the model's ``max_position_embeddings``: a position
    >= P has no embedding and raises RequestError (learned tables cannot extrapolate).
    """
    return table[positions].astype(compute_dtype(table))  # [T,D]


# ---------------------------------------------------------------------------------------------
# sinusoidal_positions

def _sinusoidal_cases(rng: np.random.Generator):
    yield Case("T=1,pos=0,dim=8", {"positions": np.array([0]), "dim": 8})
    yield Case("T=6,dim=16", {"positions": np.arange(6), "dim": 16})
    yield Case("T=5,dim=13(odd),start=40", {"positions": np.arange(40, 45), "dim": 13})
    yield Case("T=7,dim=12,base=500", {"positions": rng.integers(0, 64, size=7), "dim": 12, "base": 500.0})
    yield Case("T=4,dim=10,dtype=f64", {"positions": np.arange(4, dtype=np.float64) + 3.0, "dim": 10,
                                        "dtype": "float64"})
    yield Case("T=1,dim=7,dtype=f64,pos=50", {"positions": np.array([50.0]), "dim": 7, "dtype": "float64"})


@op("sinusoidal_positions",
    signature='sinusoidal_positions(positions[T], dim, base=10000.0, dtype="float32") -> [T,dim]',
    dtypes='positions: integer or real; dtype: "float32"|"float64" (angles always computed in float64)',
    tolerance={"float32": 1e-5, "float64": 1e-12},  # f32: room for float32 angles at positions < 100
    cases=_sinusoidal_cases,
    source="Vaswani et al. 2017 'Attention Is All You Need' sec. 3.5; seed '3. Rotary Position "
           "Embeddings' (1. Original Transformer: even dims sin, odd dims cos)",
    spec_file=SPEC, check=check_sinusoidal_positions_args)
def sinusoidal_positions(positions, dim, base=10000.0, dtype="float32"):
    """The fixed sinusoidal position table of the original Transformer, interleaved as in the paper.

    For column j (0 <= j < dim) with pair index i = j // 2 and angle a = pos / base**(2i / dim):
    ``PE[pos, 2i] = sin(a)`` (even columns) and ``PE[pos, 2i+1] = cos(a)`` (odd columns).
    An odd ``dim`` simply ends on a sin column. Angles are computed in float64 and the table is
    rounded once to ``dtype`` ("float32" or "float64"). Returns [T, dim].
    """
    j = np.arange(dim)                                            # [dim]
    inv_freq = float(base) ** (-(2 * (j // 2)) / dim)             # [dim]  base^(-2i/dim)
    angles = positions.astype(np.float64)[:, None] * inv_freq     # [T,dim]
    table = np.where(j % 2 == 0, np.sin(angles), np.cos(angles))  # [T,dim]
    return table.astype(dtype)


# ---------------------------------------------------------------------------------------------
# ALiBi

def _power_of_two_slopes(n: int) -> np.ndarray:
    """Geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8) for n a power of two."""
    return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)  # [n]


@op("alibi_slopes",
    signature="alibi_slopes(num_heads) -> [H] float64",
    dtypes="num_heads: positive int; output float64",
    tolerance={"float32": 1e-12, "float64": 1e-12},
    cases=lambda rng: (Case(f"H={h}", {"num_heads": h}) for h in (1, 3, 8, 12, 16, 20, 64)),
    source="Press, Smith, Lewis 2022 'Train Short, Test Long' (ALiBi) sec. 3; official code "
           "ofirpress/attention_with_linear_biases (get_slopes, non-power-of-two rule)",
    spec_file=SPEC, check=check_alibi_slopes_args)
def alibi_slopes(num_heads):
    """The per-head ALiBi slopes m_h, float64 [H].

    n a power of two: the geometric sequence starting at 2^(-8/n) with ratio 2^(-8/n), i.e.
    ``m_h = 2^(-8 (h+1) / n)`` (8 heads: 1/2, 1/4, ..., 1/256).
    Otherwise, with m = the largest power of two below n: the m slopes for m heads, followed by
    the first n - m of every other slope (indices 0, 2, 4, ...) of the 2m-head sequence, i.e.
    ``2^(-8 (2k+1) / (2m))`` for k = 0 .. n-m-1 (the paper's rule, as in its official code).
    """
    n = num_heads
    if n & (n - 1) == 0:
        return _power_of_two_slopes(n)  # [n]
    m = 1 << (n.bit_length() - 1)  # largest power of two below n
    extra = _power_of_two_slopes(2 * m)[0::2][: n - m]  # [n-m]
    return np.concatenate([_power_of_two_slopes(m), extra])  # [n]


def _alibi_bias_cases(rng: np.random.Generator):
    yield Case("H=8,T=5,S=5", {"slopes": alibi_slopes(8), "q_positions": np.arange(5),
                               "k_positions": np.arange(5)})
    yield Case("H=12,T=1,S=9,decode", {"slopes": alibi_slopes(12), "q_positions": np.array([8]),
                                       "k_positions": np.arange(9)})
    yield Case("H=3,T=4,S=7,start=3,f32", {"slopes": alibi_slopes(3).astype(np.float32),
                                           "q_positions": np.arange(3, 7), "k_positions": np.arange(7)})
    yield Case("H=5,T=6,S=6,f32,random", {"slopes": rng.uniform(0.01, 1.0, size=5).astype(np.float32),
                                          "q_positions": np.arange(6), "k_positions": np.arange(6)})
    yield Case("H=4,T=3,S=11,f32,bigpos", {"slopes": alibi_slopes(4).astype(np.float32),
                                           "q_positions": np.arange(1000, 1003),
                                           "k_positions": np.arange(992, 1003)})


@op("alibi_bias",
    signature="alibi_bias(slopes[H], q_positions[T], k_positions[S]) -> [H,T,S]",
    dtypes="slopes: f32|f64 (output dtype = slopes' compute dtype); positions: integers",
    tolerance={"float32": 1e-6, "float64": 1e-12},
    cases=_alibi_bias_cases,
    source="Press, Smith, Lewis 2022 'Train Short, Test Long' (ALiBi) sec. 3, eq. softmax(q_i K^T + "
           "m * [-(i-1), ..., -1, 0])",
    spec_file=SPEC, check=check_alibi_bias_args)
def alibi_bias(slopes, q_positions, k_positions):
    """The ALiBi attention bias ``bias[h, i, j] = -m_h * (q_i - k_j) = m_h * (k_j - q_i)``.

    slopes: [H]; q_positions: [T]; k_positions: [S] (absolute token positions). Visible keys
    (k_j <= q_i) get a bias <= 0 that grows linearly with distance; keys after the query get a
    positive value, which the causal mask hides. The product is taken in float64 and rounded once
    to the slopes' compute dtype (float64 stays float64, else float32). Returns [H, T, S].
    """
    q = q_positions.astype(np.float64)  # [T]
    k = k_positions.astype(np.float64)  # [S]
    distance = k[None, :] - q[:, None]  # [T,S]  (<= 0 for visible keys)
    bias = slopes.astype(np.float64)[:, None, None] * distance[None]  # [H,T,S]
    return bias.astype(compute_dtype(slopes))
