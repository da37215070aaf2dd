"""Property-based conformance: hypothesis draws shapes, dtypes and values for the main ops, and every
available non-reference backend must match the NumPy reference within the op's registry tolerance
(``gptevo.conformance.compare.compare``; bit-exact for exact ops such as mxfp4_decode).

Shapes come from hypothesis (so failures shrink to small shapes); values come from a NumPy
generator seeded by hypothesis (fast for arrays). An unavailable backend, or one that lacks the op,
is a skip with the reason. Test ids read like ``test_linear[numba]``.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gptevo import backends
from gptevo.conformance.compare import compare
from gptevo.conformance.runner import tolerance_for
from gptevo.ops import REGISTRY, Case
from gptevo.ops.mxfp4 import Mxfp4Weight

AVAILABLE = backends.available()
PEERS = [name for name in backends.known() if name != "reference"]
WEIGHT_DTYPES = {"f32w": np.float32, "f16w": np.float16, "bf16w": ml_dtypes.bfloat16}


@pytest.fixture(scope="module", params=PEERS)
def backend(request):
    """The backend's name (hypothesis inspects the arguments, so pass the name, not the Backend)."""
    name = request.param
    if name not in AVAILABLE:
        pytest.skip(f"backend {name!r} unavailable: {AVAILABLE.unavailable[name]}")
    return name


def check(backend_name, op, **kwargs):
    """Run ``op`` on the backend and the reference and assert they agree (skip if the op is absent)."""
    backend = backends.get(backend_name)
    if op not in backend.ops:
        pytest.skip(f"backend {backend.name!r} lacks op {op}")
    spec = REGISTRY[op]
    ref = spec.reference(**kwargs)
    out = backend.ops[op](**kwargs)
    mismatch = compare(out, ref, tolerance_for(spec, Case("hypothesis", kwargs)), spec.exact)
    shapes = {k: getattr(v, "shape", v) for k, v in kwargs.items()}
    assert mismatch is None, f"{op}[{backend.name}]({shapes}): {mismatch}"


seeds = st.integers(0, 2**32 - 1)
act_dtypes = st.sampled_from([np.float32, np.float64])
weight_tags = st.sampled_from(sorted(WEIGHT_DTYPES))


def mxfp4(rng, rows, cols, lo=118, hi=130):
    """A packed MXFP4 weight [rows..., cols] with random codes and scales in 2**(lo-127)..2**(hi-127)."""
    rows = tuple(np.atleast_1d(rows))
    blocks = rng.integers(0, 256, (*rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(lo, hi, (*rows, cols // 32), dtype=np.uint8)
    return Mxfp4Weight(blocks, scales, name="hypothesis")


# ---------------------------------------------------------------------------------------------
# norms and activations

@given(seed=seeds, lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), d=st.integers(1, 40),
       dtype=act_dtypes, wtag=weight_tags, offset=st.sampled_from([0.0, 1.0]), eps=st.sampled_from([1e-6, 1e-5]))
def test_rms_norm(backend, seed, lead, d, dtype, wtag, offset, eps):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*lead, d)) * rng.uniform(0.01, 30)).astype(dtype)
    w = (1 + 0.2 * rng.standard_normal(d)).astype(WEIGHT_DTYPES[wtag])
    check(backend, "rms_norm", x=x, weight=w, eps=eps, offset=offset)


@given(seed=seeds, lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), d=st.integers(1, 40),
       dtype=act_dtypes, wtag=weight_tags, with_bias=st.booleans())
def test_layer_norm(backend, seed, lead, d, dtype, wtag, with_bias):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*lead, d)) * rng.uniform(0.01, 30) + rng.uniform(-5, 5)).astype(dtype)
    w = (1 + 0.2 * rng.standard_normal(d)).astype(WEIGHT_DTYPES[wtag])
    b = (0.3 * rng.standard_normal(d)).astype(WEIGHT_DTYPES[wtag]) if with_bias else None
    check(backend, "layer_norm", x=x, weight=w, bias=b, eps=1e-5)


@given(seed=seeds, shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), dtype=act_dtypes,
       scale=st.sampled_from([0.1, 3.0, 40.0]),
       op=st.sampled_from(["silu", "gelu:none", "gelu:tanh", "swiglu", "clamped_swiglu"]))
def test_activations(backend, seed, shape, dtype, scale, op):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    if op == "silu":
        check(backend, "silu", x=x)
    elif op.startswith("gelu"):
        check(backend, "gelu", x=x, approximate=op.split(":")[1])
    elif op == "swiglu":
        check(backend, "swiglu", gate=x, up=rng.standard_normal(shape).astype(dtype))
    else:
        h = (rng.standard_normal((*shape[:-1], 2 * shape[-1])) * scale).astype(dtype)
        check(backend, "clamped_swiglu", h=h, alpha=float(rng.uniform(0.5, 2.0)), limit=float(rng.uniform(1, 8)))


# ---------------------------------------------------------------------------------------------
# linear, embedding, MXFP4

@given(seed=seeds, t=st.integers(1, 5), n_in=st.integers(1, 70), n_out=st.integers(1, 40), dtype=act_dtypes,
       wtag=weight_tags, with_bias=st.booleans())
def test_linear(backend, seed, t, n_in, n_out, dtype, wtag, with_bias):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, n_in)).astype(dtype)
    w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(WEIGHT_DTYPES[wtag])
    b = (0.1 * rng.standard_normal(n_out)).astype(WEIGHT_DTYPES[wtag]) if with_bias else None
    check(backend, "linear", x=x, weight=w, bias=b)


@given(seed=seeds, t=st.integers(5, 160), n_in=st.one_of(st.integers(1, 40), st.sampled_from([32, 64, 96])),
       n_out=st.integers(1, 1100), dtype=act_dtypes, wtag=weight_tags, with_bias=st.booleans())
def test_linear_many_rows(backend, seed, t, n_in, n_out, dtype, wtag, with_bias):
    """Batched-decode and prefill row counts: the backends' multi-row paths (numba: register tiles
    for 5-16 rows when K % 32 == 0, the small-GEMM loops otherwise; above 16 rows BLAS split by rows
    or columns over its threads, 16-bit weights widened in 512-row tiles, so n_out > 512 spans
    several tiles)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, n_in)).astype(dtype)
    w = rng.standard_normal((n_out, n_in)).astype(WEIGHT_DTYPES[wtag])
    b = (0.1 * rng.standard_normal(n_out)).astype(WEIGHT_DTYPES[wtag]) if with_bias else None
    check(backend, "linear", x=x, weight=w, bias=b)


@given(seed=seeds, t=st.integers(1, 4), groups=st.integers(1, 3), n_out=st.integers(1, 24), dtype=act_dtypes,
       with_bias=st.booleans())
def test_linear_mxfp4(backend, seed, t, groups, n_out, dtype, with_bias):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, 32 * groups)).astype(dtype)
    b = (0.1 * rng.standard_normal(n_out)).astype(ml_dtypes.bfloat16) if with_bias else None
    check(backend, "linear", x=x, weight=mxfp4(rng, n_out, 32 * groups), bias=b)


@given(seed=seeds, lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), groups=st.integers(0, 4),
       dtype=st.sampled_from(["float32", "float64"]), full_range=st.booleans())
def test_mxfp4_decode(backend, seed, lead, groups, dtype, full_range):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (*lead, groups, 16), dtype=np.uint8)
    lo, hi = (0, 256) if full_range else (100, 150)            # full range: inf overflow and NaN scales
    scales = rng.integers(lo, hi, (*lead, groups), dtype=np.uint8)
    check(backend, "mxfp4_decode", blocks=blocks, scales=scales, dtype=dtype)


@given(seed=seeds, v=st.integers(1, 20), d=st.integers(1, 12), t=st.integers(1, 8),
       tdtype=st.sampled_from([np.float32, np.float64, np.float16, ml_dtypes.bfloat16]),
       idtype=st.sampled_from([np.int64, np.int32, np.uint8]))
def test_embedding(backend, seed, v, d, t, tdtype, idtype):
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((v, d)) * 10).astype(tdtype)
    if tdtype == np.float16:
        table[0, 0] = np.float16(3e-7)                            # a float16 subnormal must widen exactly
    ids = rng.integers(0, v, t).astype(idtype)
    check(backend, "embedding", table=table, ids=ids)


# ---------------------------------------------------------------------------------------------
# softmax, attention, RoPE

@given(seed=seeds, rows=st.lists(st.integers(1, 5), min_size=0, max_size=2), s=st.integers(1, 64),
       dtype=act_dtypes, masked=st.sampled_from([0.0, 0.3, 1.0]),
       sinks=st.sampled_from(["none", "per_row", "scalar", "broadcast"]), scale=st.sampled_from([1.0, 30.0]))
def test_softmax(backend, seed, rows, s, dtype, masked, sinks, scale):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((*rows, s))).astype(dtype)
    x[rng.random(x.shape) < masked] = -np.inf
    sink = {"none": None, "per_row": rng.standard_normal(rows).astype(dtype),
            "scalar": np.asarray(rng.standard_normal(), dtype=dtype),
            "broadcast": rng.standard_normal((*rows[:-1], 1)).astype(dtype) if rows else None}[sinks]
    check(backend, "softmax", x=x, sinks=sink)


@st.composite
def attention_inputs(draw):
    """q/k/v with GQA ratios, prefill / decode / explicit offsets / ring-buffer slots, windows, sinks, ALiBi;
    T and S up to 140 so backends' blocked paths (several query blocks) are drawn too."""
    rng = np.random.default_rng(draw(seeds))
    dtype = draw(act_dtypes)
    g = draw(st.integers(1, 3))
    h = g * draw(st.integers(1, 3))
    dh, dv = draw(st.integers(1, 16)), draw(st.integers(1, 12))
    mode = draw(st.sampled_from(["prefill", "decode", "offset", "ring"]))
    s = draw(st.one_of(st.integers(1, 24), st.integers(60, 140)))   # long: blocked multi-query paths
    t = {"prefill": s, "decode": 1}.get(mode, draw(st.integers(1, s)))
    kwargs = {"q": rng.standard_normal((t, h, dh)).astype(dtype), "k": rng.standard_normal((s, g, dh)).astype(dtype),
              "v": rng.standard_normal((s, g, dv)).astype(dtype)}
    if mode in ("offset", "decode") and draw(st.booleans()):     # positions start past 0 (after a prompt)
        start = draw(st.integers(0, 1000))
        kwargs["k_positions"] = np.arange(start, start + s, dtype=np.int64)
        kwargs["q_positions"] = np.arange(start + s - t, start + s, dtype=np.int64)
    elif mode == "ring":                                          # rotated slots, some still empty (-1)
        pos = np.roll(np.arange(s, dtype=np.int64) + draw(st.integers(0, 50)), draw(st.integers(0, s)))
        pos[rng.random(s) < 0.2] = -1
        kwargs["k_positions"] = pos
        kwargs["q_positions"] = np.sort(rng.integers(0, pos.max() + 2, t)).astype(np.int64)
    window = draw(st.one_of(st.none(), st.integers(1, s + 2)))
    kwargs["window"] = window
    if draw(st.booleans()):
        kwargs["sinks"] = rng.standard_normal(h).astype(dtype)
    if draw(st.booleans()):
        kwargs["scale"] = float(rng.uniform(0.05, 1.0))
    if draw(st.integers(0, 3)) == 0:
        kwargs["alibi_slopes"] = (2.0 ** (-8.0 * np.arange(1, h + 1) / h)).astype(dtype)
    return kwargs


@given(kwargs=attention_inputs())
def test_attention(backend, kwargs):
    check(backend, "attention", **kwargs)


@given(seed=seeds, t=st.integers(1, 6), h=st.integers(1, 4), half_dh=st.integers(1, 12), dtype=act_dtypes,
       interleaved=st.booleans(), partial=st.booleans())
def test_apply_rope(backend, seed, t, h, half_dh, dtype, interleaved, partial):
    rng = np.random.default_rng(seed)
    dh = 2 * half_dh + (rng.integers(0, 3) if partial else 0)
    half = int(rng.integers(1, half_dh + 1)) if partial else half_dh
    angle = rng.uniform(-np.pi, np.pi, (t, half))
    check(backend, "apply_rope", x=rng.standard_normal((t, h, dh)).astype(dtype),
          cos=np.cos(angle).astype(dtype), sin=np.sin(angle).astype(dtype), interleaved=interleaved)


@given(seed=seeds, t=st.integers(1, 8), half=st.integers(1, 32), dtype=act_dtypes,
       theta=st.sampled_from([1e4, 1.5e5, 1e6]), max_pos=st.sampled_from([16, 4096, 131072]),
       factor=st.sampled_from([1.0, 1.3465736]))
def test_rope_cos_sin(backend, seed, t, half, dtype, theta, max_pos, factor):
    rng = np.random.default_rng(seed)
    inv_freq = (1.0 / theta ** (np.arange(half) / half)).astype(dtype)
    check(backend, "rope_cos_sin", positions=rng.integers(0, max_pos, t).astype(np.int64), inv_freq=inv_freq,
          attention_factor=factor)


# ---------------------------------------------------------------------------------------------
# MoE

@given(seed=seeds, t=st.integers(1, 6), e=st.integers(1, 40), data=st.data(),
       order=st.sampled_from(["softmax_topk", "topk_softmax"]), renormalize=st.booleans(),
       ldtype=st.sampled_from([np.float32, np.float64, ml_dtypes.bfloat16]), ties=st.booleans())
def test_moe_route(backend, seed, t, e, data, order, renormalize, ldtype, ties):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, e), label="k")
    logits = (rng.integers(-2, 3, (t, e)) if ties else 3 * rng.standard_normal((t, e))).astype(ldtype)
    check(backend, "moe_route", logits=logits, k=k, order=order, renormalize=renormalize)


@given(seed=seeds, t=st.integers(1, 5), e=st.integers(1, 6), data=st.data(), dtype=act_dtypes,
       wtag=st.sampled_from(["f32w", "f16w", "bf16w", "mxfp4"]), act=st.sampled_from(["swiglu", "clamped_swiglu"]),
       with_bias=st.booleans())
def test_moe_experts(backend, seed, t, e, data, dtype, wtag, act, with_bias):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, e), label="k")
    if wtag == "mxfp4":                                           # blocks run along D and I: multiples of 32
        d, i = data.draw(st.sampled_from([32, 64]), label="D"), 32
        w_gate_up, w_down = mxfp4(rng, (e, 2 * i), d, 120, 128), mxfp4(rng, (e, d), i, 118, 126)
    else:
        d, i = data.draw(st.integers(1, 24), label="D"), data.draw(st.integers(1, 12), label="I")
        w_gate_up = (0.5 * rng.standard_normal((e, 2 * i, d))).astype(WEIGHT_DTYPES[wtag])
        w_down = (0.3 * rng.standard_normal((e, d, i))).astype(WEIGHT_DTYPES[wtag])
    bdt = np.float32 if wtag == "mxfp4" else WEIGHT_DTYPES[wtag]
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int64)
    check(backend, "moe_experts", x=(2 * rng.standard_normal((t, d))).astype(dtype),
          weights=rng.dirichlet(np.ones(k), size=t).astype(dtype), ids=ids,
          w_gate_up=w_gate_up, b_gate_up=(0.2 * rng.standard_normal((e, 2 * i))).astype(bdt) if with_bias else None,
          w_down=w_down, b_down=(0.2 * rng.standard_normal((e, d))).astype(bdt) if with_bias else None,
          activation=act, alpha=1.702, limit=7.0)


@given(seed=seeds, t=st.integers(1, 5), k=st.integers(1, 4), d=st.integers(1, 33), dtype=act_dtypes)
def test_moe_combine(backend, seed, t, k, d, dtype):
    rng = np.random.default_rng(seed)
    check(backend, "moe_combine", expert_out=rng.standard_normal((t, k, d)).astype(dtype),
          weights=rng.dirichlet(np.ones(k), size=t).astype(dtype))
