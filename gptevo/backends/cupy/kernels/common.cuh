// Shared device helpers for the gptevo CUDA kernels (included by every module; the Python loader
// inlines this file, so NVRTC, nvcc and the CPU emulator all see one self-contained source).
//
// Rules (see spec/backends.md): no toolkit headers, no inline PTX, only *_sync warp intrinsics.
// bf16, f16, FP4 (E2M1) and E8M0 are carried as raw bits and converted with the helpers below;
// the conversions are exact (bf16/f16 -> f32 widening, MXFP4 decode), and built from integer
// operations so that flush-to-zero (-ftz=true, CuPy's default) never touches a subnormal result.
#pragma once

#define GPTEVO_WARP 32
#define GPTEVO_FULL_MASK 0xffffffffu

// ---- raw-bit conversions ------------------------------------------------------------------------

// bfloat16 -> float32: the bf16 bits are the high half of the float32 bits (exact).
__device__ __forceinline__ unsigned int bf16_bits_to_f32_bits(unsigned short h) {
    return ((unsigned int)h) << 16;
}

// IEEE binary16 -> float32 bits, exact for every input. A subnormal half (man * 2^-24) becomes a
// normal float; the product below is exact and normal, so flush-to-zero cannot touch it.
__device__ __forceinline__ unsigned int f16_bits_to_f32_bits(unsigned short h) {
    unsigned int sign = ((unsigned int)(h & 0x8000u)) << 16;
    unsigned int exp = (h >> 10) & 0x1fu;
    unsigned int man = h & 0x3ffu;
    if (exp == 0x1fu) return sign | 0x7f800000u | (man << 13);          // inf / NaN
    if (exp == 0) return sign | __float_as_uint((float)man * 5.9604644775390625e-08f);   // 0 or subnormal
    return sign | ((exp + 112u) << 23) | (man << 13);                    // 112 = 127 - 15
}

__device__ __forceinline__ float bits_to_f32(unsigned int b) { return __uint_as_float(b); }

// Widen one stored weight element to the compute type T (T = float or double).
template <typename T> __device__ __forceinline__ T widen_f32(float v) { return (T)v; }
template <typename T> __device__ __forceinline__ T widen_f64(double v) { return (T)v; }
template <typename T> __device__ __forceinline__ T widen_bf16(unsigned short h) {
    return (T)bits_to_f32(bf16_bits_to_f32_bits(h));
}
template <typename T> __device__ __forceinline__ T widen_f16(unsigned short h) {
    return (T)bits_to_f32(f16_bits_to_f32_bits(h));
}

// ---- MXFP4 (OCP MX v1.0): E2M1 code times 2^(scale - 127) -----------------------------------------
// A nonzero E2M1 magnitude (code & 7 in 1..7) is (1 + f/2) * 2^p with
//   code: 1    2    3    4    5    6    7
//   val : 0.5  1    1.5  2    3    4    6
//   p   : -1   0    0    1    1    2    2      f = 0 for codes 1, 2, 4, 6 and 1 for codes 3, 5, 7
// so the product with 2^(s-127) is built directly as float bits (exact, no arithmetic).
__device__ __forceinline__ int e2m1_pow(unsigned int mag) { return mag == 1u ? -1 : (int)(mag >> 1) - 1; }
__device__ __forceinline__ unsigned int e2m1_frac(unsigned int mag) { return (mag & 1u) & (mag != 1u ? 1u : 0u); }

// float32 bits of code * 2^(scale-127); scale 255 (E8M0 NaN) gives a quiet NaN.
__device__ __forceinline__ unsigned int mxfp4_f32_bits(unsigned int code, unsigned int scale) {
    if (scale == 255u) return 0x7fc00000u;
    unsigned int sign = (code & 8u) << 28;
    unsigned int mag = code & 7u;
    if (mag == 0u) return sign;
    int e = e2m1_pow(mag) + (int)scale - 127;                          // unbiased exponent
    unsigned int f = e2m1_frac(mag);
    if (e > 127) return sign | 0x7f800000u;                              // overflow: +-inf
    if (e >= -126) return sign | ((unsigned int)(e + 127) << 23) | (f << 22);
    return sign | ((2u + f) << (e + 148));                              // subnormal: (2+f) * 2^(e-1)
}

// float64 bits of code * 2^(scale-127) (always a normal double).
__device__ __forceinline__ unsigned long long mxfp4_f64_bits(unsigned int code, unsigned int scale) {
    if (scale == 255u) return 0x7ff8000000000000ull;
    unsigned long long sign = ((unsigned long long)(code & 8u)) << 60;
    unsigned int mag = code & 7u;
    if (mag == 0u) return sign;
    int e = e2m1_pow(mag) + (int)scale - 127;
    unsigned long long f = e2m1_frac(mag);
    return sign | ((unsigned long long)(e + 1023) << 52) | (f << 51);
}

template <typename T> __device__ __forceinline__ T mxfp4_value(unsigned int code, unsigned int scale);
template <> __device__ __forceinline__ float mxfp4_value<float>(unsigned int code, unsigned int scale) {
    return __uint_as_float(mxfp4_f32_bits(code, scale));
}
template <> __device__ __forceinline__ double mxfp4_value<double>(unsigned int code, unsigned int scale) {
    return __longlong_as_double((long long)mxfp4_f64_bits(code, scale));
}

// 2^(scale - 127) in T for an E8M0 scale byte < 255 (float: scale 0 gives 0, as flush-to-zero would).
template <typename T> __device__ __forceinline__ T e8m0_value(unsigned int scale);
template <> __device__ __forceinline__ float e8m0_value<float>(unsigned int scale) { return __uint_as_float(scale << 23); }
template <> __device__ __forceinline__ double e8m0_value<double>(unsigned int scale) {
    return __longlong_as_double((long long)(scale + 896u) << 52);        // 896 = 1023 - 127
}

// ---- 16-byte vector loads -------------------------------------------------------------------------
// An aligned 16-byte struct: nvcc/NVRTC read it with one 128-bit load.
struct alignas(16) Bytes16 { unsigned int w[4]; };

// Read N consecutive T from p (16-byte aligned when N * sizeof(T) is a multiple of 16).
template <typename T, int N> __device__ __forceinline__ void load_run(const T* __restrict__ p, T (&out)[N]) {
    if constexpr ((N * sizeof(T)) % 16 == 0) {
        const Bytes16* v = reinterpret_cast<const Bytes16*>(p);
#pragma unroll
        for (int c = 0; c < (int)(N * sizeof(T) / 16); ++c) {
            Bytes16 b = v[c];
#pragma unroll
            for (int j = 0; j < (int)(16 / sizeof(T)); ++j) {
                if constexpr (sizeof(T) == 4) out[c * 4 + j] = __uint_as_float(b.w[j]);
                else out[c * 2 + j] = __longlong_as_double((long long)(((unsigned long long)b.w[2 * j + 1] << 32) | b.w[2 * j]));
            }
        }
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) out[j] = p[j];
    }
}

// ---- math in the compute type (float or double) ---------------------------------------------------
__device__ __forceinline__ float r_exp(float x) { return expf(x); }
__device__ __forceinline__ double r_exp(double x) { return exp(x); }
__device__ __forceinline__ float r_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double r_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float r_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double r_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float r_min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double r_min(double a, double b) { return fmin(a, b); }
template <typename T> __device__ __forceinline__ T r_neg_inf();
template <> __device__ __forceinline__ float r_neg_inf<float>() { return __uint_as_float(0xff800000u); }
template <> __device__ __forceinline__ double r_neg_inf<double>() {
    return __longlong_as_double((long long)0xfff0000000000000ull);
}
__device__ __forceinline__ bool r_isfinite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ bool r_isfinite(double x) {
    return (((unsigned long long)__double_as_longlong(x)) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// ---- reductions -----------------------------------------------------------------------------------
// Butterfly sum / max over the 32 lanes of a full warp: every lane gets the result. All 32 lanes
// must call it (kernels keep whole warps active around these calls).
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int off = GPTEVO_WARP / 2; off > 0; off >>= 1) v += __shfl_xor_sync(GPTEVO_FULL_MASK, v, off);
    return v;
}
template <typename T> __device__ __forceinline__ T warp_max(T v) {
    for (int off = GPTEVO_WARP / 2; off > 0; off >>= 1) v = r_max(v, __shfl_xor_sync(GPTEVO_FULL_MASK, v, off));
    return v;
}

// Block-wide sum / max; blockDim.x must be a multiple of 32 (<= 1024) and every thread must call it.
// ``scratch`` is a __shared__ array of at least 32 elements; the result is returned to every thread.
template <typename T> __device__ T block_sum(T v, T* scratch) {
    int lane = threadIdx.x % GPTEVO_WARP, warp = threadIdx.x / GPTEVO_WARP;
    int nwarps = blockDim.x / GPTEVO_WARP;
    v = warp_sum(v);
    __syncthreads();                        // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T total = (T)0;
    for (int w = 0; w < nwarps; ++w) total += scratch[w];   // same order in every thread
    return total;
}
template <typename T> __device__ T block_max(T v, T* scratch) {
    int lane = threadIdx.x % GPTEVO_WARP, warp = threadIdx.x / GPTEVO_WARP;
    int nwarps = blockDim.x / GPTEVO_WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T best = scratch[0];
    for (int w = 1; w < nwarps; ++w) best = r_max(best, scratch[w]);
    return best;
}
