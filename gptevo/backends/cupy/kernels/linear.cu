// Grouped linear (spec/ops/linear.md, spec/ops/moe.md; references gptevo/ops/linear.py, moe.py):
//   y[p, r] = sum_i x[src[p], i] * W[eid[p], r, i] + b[eid[p], r]      for p < n_pairs, r < n_out
// ``linear`` is the case E = 1 (eid = 0, src = p); the MoE expert projections use one pair per
// (token, slot) with eid = the routed expert. W is [E, n_out, n_in] stored as f32, f64, f16 or bf16
// (raw u16 bits), widened in registers; or MXFP4 (blocks u8 [E, n_out, n_in/32, 16], scales u8
// [E, n_out, n_in/32]) decoded in registers. The bias arrives widened to T ([E, n_out]).
//
// One warp per output row r and chunk of LIN_TOK consecutive pairs; lanes stride over the input,
// then a butterfly warp sum. Dense weights: when n_in is a multiple of the 16-byte vector width
// each lane reads 16 bytes of weights (8 bf16/f16, 4 f32, 2 f64) and the matching x run per step,
// else one element. MXFP4: each lane reads one 32-bit word (8 codes of one block) per step, sums
// x * E2M1(code) from a 16-entry table in shared memory, and multiplies the block sum by the scale
// 2^(s-127) once; blocks with scale >= 253 (whose elements overflow to inf, or NaN at 255) take the
// exact per-element decode instead, so infinities and NaNs come out as in the reference.
// blockDim.x = 32 * rows per block; grid = (ceil(n_out / rows per block), chunks, capped at 65535),
// the y dimension looping over chunks. Every thread runs Weight::prepare() (it may hold a barrier)
// before any warp leaves. Entry points: grouped_linear_{f32,f64}_{f32w,f64w,f16w,bf16w,mxfp4}.
#include "common.cuh"

#define LIN_TOK 4

enum { W_F32 = 0, W_F64 = 1, W_F16 = 2, W_BF16 = 3 };

template <int KIND> struct Stored;                      // the storage type of each weight kind
template <> struct Stored<W_F32> { typedef float type; };
template <> struct Stored<W_F64> { typedef double type; };
template <> struct Stored<W_F16> { typedef unsigned short type; };
template <> struct Stored<W_BF16> { typedef unsigned short type; };

template <typename T, int KIND> __device__ __forceinline__ T load_weight(const void* w, long long i) {
    if constexpr (KIND == W_F32) return (T)((const float*)w)[i];
    else if constexpr (KIND == W_F64) return (T)((const double*)w)[i];
    else if constexpr (KIND == W_F16) return widen_f16<T>(((const unsigned short*)w)[i]);
    else return widen_bf16<T>(((const unsigned short*)w)[i]);
}

// Element e of a 16-byte run of stored weights, widened to T.
template <typename T, int KIND> __device__ __forceinline__ T unpack_weight(const Bytes16& b, int e) {
    if constexpr (KIND == W_F32) return (T)__uint_as_float(b.w[e]);
    else if constexpr (KIND == W_F64)
        return (T)__longlong_as_double((long long)(((unsigned long long)b.w[2 * e + 1] << 32) | b.w[2 * e]));
    else {
        unsigned int word = b.w[e / 2];
        unsigned short h = (unsigned short)((e & 1) ? (word >> 16) : (word & 0xffffu));
        if constexpr (KIND == W_F16) return widen_f16<T>(h);
        else return widen_bf16<T>(h);
    }
}

// Partial dot product of one lane: row ``row`` of a dense weight with the input vector xr.
template <typename T, int KIND> struct DenseWeight {
    const void* w;
    int n_in;
    __device__ void prepare() {}
    __device__ T dot(long long row, const T* __restrict__ xr, int lane) const {
        typedef typename Stored<KIND>::type S;
        constexpr int VEC = 16 / sizeof(S);
        long long base = row * n_in;
        T acc = (T)0;
        if (n_in % VEC == 0) {                          // aligned rows: 16-byte weight loads
            const Bytes16* wrow = reinterpret_cast<const Bytes16*>((const S*)w + base);
            for (int i = lane * VEC; i < n_in; i += GPTEVO_WARP * VEC) {
                Bytes16 b = wrow[i / VEC];
                T xs[VEC];
                load_run<T, VEC>(xr + i, xs);
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc += xs[e] * unpack_weight<T, KIND>(b, e);
            }
        } else {
            for (int i = lane; i < n_in; i += GPTEVO_WARP) acc += xr[i] * load_weight<T, KIND>(w, base + i);
        }
        return acc;
    }
};

// Same for MXFP4 (n_in is a multiple of 32). Word u of a row holds elements 8u .. 8u+7, element
// 8u + k in bits 4k .. 4k+3 (byte j: low nibble = element 2j, high nibble = element 2j+1).
template <typename T> struct Mxfp4Weight {
    const unsigned char* blocks;
    const unsigned char* scales;
    int n_in;
    const T* lut;                                       // E2M1 value of each code, in shared memory
    __device__ void prepare() {
        __shared__ T table[16];
        if (threadIdx.x < 16) table[threadIdx.x] = mxfp4_value<T>(threadIdx.x, 127u);
        __syncthreads();
        lut = table;
    }
    __device__ T dot(long long row, const T* __restrict__ xr, int lane) const {
        int groups = n_in / 32;
        const unsigned int* words = reinterpret_cast<const unsigned int*>(blocks + row * groups * 16);
        const unsigned char* s = scales + row * groups;
        T acc = (T)0;
        for (int u = lane; u < groups * 4; u += GPTEVO_WARP) {
            unsigned int word = words[u], scale = s[u >> 2];
            T xs[8];
            load_run<T, 8>(xr + 8 * u, xs);
            if (scale < 253u) {
                T part = (T)0;
#pragma unroll
                for (int k = 0; k < 8; ++k) part += xs[k] * lut[(word >> (4 * k)) & 0xfu];
                acc += part * e8m0_value<T>(scale);
            } else {                                    // inf / NaN weights: decode each element
#pragma unroll
                for (int k = 0; k < 8; ++k) acc += xs[k] * mxfp4_value<T>((word >> (4 * k)) & 0xfu, scale);
            }
        }
        return acc;
    }
};

template <typename T, typename W>
__device__ void grouped_linear(const T* __restrict__ x, const long long* __restrict__ src,
                               const long long* __restrict__ eid, W weight, const T* __restrict__ bias,
                               int has_bias, T* __restrict__ y, int n_pairs, int n_out, int n_in) {
    weight.prepare();                                     // every thread, before any warp leaves
    int lane = threadIdx.x % GPTEVO_WARP;
    int r = blockIdx.x * (blockDim.x / GPTEVO_WARP) + threadIdx.x / GPTEVO_WARP;
    if (r >= n_out) return;                               // the whole warp leaves together
    int n_chunks = (n_pairs + LIN_TOK - 1) / LIN_TOK;
    for (int c = blockIdx.y; c < n_chunks; c += gridDim.y) {
        for (int q = 0; q < LIN_TOK; ++q) {
            int p = c * LIN_TOK + q;
            if (p >= n_pairs) break;                      // uniform across the warp
            long long e = eid[p];
            T acc = weight.dot(e * n_out + r, x + src[p] * n_in, lane);
            acc = warp_sum(acc);
            if (lane == 0) y[(long long)p * n_out + r] = has_bias ? acc + bias[e * n_out + r] : acc;
        }
    }
}

extern "C" __global__ void grouped_linear_f32_f32w(const float* x, const long long* src, const long long* eid,
        const float* w, const float* b, int has_bias, float* y, int n_pairs, int n_out, int n_in) {
    grouped_linear<float>(x, src, eid, DenseWeight<float, W_F32>{w, n_in}, b, has_bias, y, n_pairs, n_out, n_in);
}
extern "C" __global__ void grouped_linear_f32_f64w(const float* x, const long long* src, const long long* eid,
        const double* w, const float* b, int has_bias, float* y, int n_pairs, int n_out, int n_in) {
    grouped_linear<float>(x, src, eid, DenseWeight<float, W_F64>{w, n_in}, b, has_bias, y, n_pairs, n_out, n_in);
}
extern "C" __global__ void grouped_linear_f32_f16w(const float* x, const long long* src, const long long* eid,
        const unsigned short* w, const float* b, int has_bias, float* y, int n_pairs, int n_out, int n_in) {
    grouped_linear<float>(x, src, eid, DenseWeight<float, W_F16>{w, n_in}, b, has_bias, y, n_pairs, n_out, n_in);
}
extern "C" __global__ void grouped_linear_f32_bf16w(const float* x, const long long* src, const long long* eid,
        const unsigned short* w, const float* b, int has_bias, float* y, int n_pairs, int n_out, int n_in) {
    grouped_linear<float>(x, src, eid, DenseWeight<float, W_BF16>{w, n_in}, b, has_bias, y, n_pairs, n_out, n_in);
}
extern "C" __global__ void grouped_linear_f32_mxfp4(const float* x, const long long* src, const long long* eid,
        const unsigned char* blocks, const unsigned char* scales, const float* b, int has_bias, float* y,
        int n_pairs, int n_out, int n_in) {
    grouped_linear<float>(x, src, eid, Mxfp4Weight<float>{blocks, scales, n_in}, b, has_bias, y, n_pairs, n_out, n_in);
}
extern "C" __global__ void grouped_linear_f64_f32w(const double* x, const long long* src, const long long* eid,
        const float* w, const double* b, int has_bias, double* y, int n_pairs, int n_out, int n_in) {
    grouped_linear<double>(x, src, eid, DenseWeight<double, W_F32>{w, n_in}, b, has_bias, y, n_pairs, n_out, n_in);
}
extern "C" __global__ void grouped_linear_f64_f64w(const double* x, const long long* src, const long long* eid,
        const double* w, const double* b, int has_bias, double* y, int n_pairs, int n_out, int n_in) {
    grouped_linear<double>(x, src, eid, DenseWeight<double, W_F64>{w, n_in}, b, has_bias, y, n_pairs, n_out, n_in);
}
extern "C" __global__ void grouped_linear_f64_f16w(const double* x, const long long* src, const long long* eid,
        const unsigned short* w, const double* b, int has_bias, double* y, int n_pairs, int n_out, int n_in) {
    grouped_linear<double>(x, src, eid, DenseWeight<double, W_F16>{w, n_in}, b, has_bias, y, n_pairs, n_out, n_in);
}
extern "C" __global__ void grouped_linear_f64_bf16w(const double* x, const long long* src, const long long* eid,
        const unsigned short* w, const double* b, int has_bias, double* y, int n_pairs, int n_out, int n_in) {
    grouped_linear<double>(x, src, eid, DenseWeight<double, W_BF16>{w, n_in}, b, has_bias, y, n_pairs, n_out, n_in);
}
extern "C" __global__ void grouped_linear_f64_mxfp4(const double* x, const long long* src, const long long* eid,
        const unsigned char* blocks, const unsigned char* scales, const double* b, int has_bias, double* y,
        int n_pairs, int n_out, int n_in) {
    grouped_linear<double>(x, src, eid, Mxfp4Weight<double>{blocks, scales, n_in}, b, has_bias, y, n_pairs, n_out, n_in);
}
