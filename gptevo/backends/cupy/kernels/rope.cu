// Rotary position embedding (spec/ops/rope.md; reference gptevo/ops/rope.py apply_rope).
// Pair (a, b) -> (a cos - b sin, b cos + a sin) for the first R = 2 * half dims of every head;
// half-split pairs dim i with i + half (NeoX/HF), interleaved pairs 2i with 2i + 1 (GPT-J);
// dims R..Dh are copied. x, y: [T, H, Dh]; cos, sin: [T, half] widened to T.
// One thread per output element (grid-stride). Entry points: apply_rope_f32, apply_rope_f64.
#include "common.cuh"

template <typename T>
__device__ void apply_rope_all(const T* __restrict__ x, const T* __restrict__ cos_t, const T* __restrict__ sin_t,
                               T* __restrict__ y, int tokens, int heads, int dh, int half, int interleaved) {
    long long n = (long long)tokens * heads * dh;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n; idx += (long long)gridDim.x * blockDim.x) {
        int j = (int)(idx % dh);
        long long head_base = idx - j;
        long long t = idx / ((long long)heads * dh);
        const T* xh = x + head_base;
        if (j >= 2 * half) { y[idx] = xh[j]; continue; }
        int i;           // frequency index of the pair
        bool first;      // this element is ``a`` (else ``b``)
        int ia, ib;      // dims of a and b
        if (interleaved) { i = j / 2; first = (j % 2) == 0; ia = 2 * i; ib = 2 * i + 1; }
        else { first = j < half; i = first ? j : j - half; ia = i; ib = i + half; }
        T c = cos_t[t * half + i], s = sin_t[t * half + i];
        T a = xh[ia], b = xh[ib];
        y[idx] = first ? a * c - b * s : b * c + a * s;
    }
}

extern "C" __global__ void apply_rope_f32(const float* x, const float* cos_t, const float* sin_t, float* y,
                                          int tokens, int heads, int dh, int half, int interleaved) {
    apply_rope_all<float>(x, cos_t, sin_t, y, tokens, heads, dh, half, interleaved);
}
extern "C" __global__ void apply_rope_f64(const double* x, const double* cos_t, const double* sin_t, double* y,
                                          int tokens, int heads, int dh, int half, int interleaved) {
    apply_rope_all<double>(x, cos_t, sin_t, y, tokens, heads, dh, half, interleaved);
}

// cos and sin tables from device positions (reference gptevo/ops/rope.py rope_cos_sin):
//   angle = T(pos[t]) * inv[i] (one rounding in T), cos = T(cos(double(angle))) * factor, same for sin.
// cos, sin: [T, half]. One thread per element (grid-stride). Entry points: rope_cos_sin_f32, rope_cos_sin_f64.
template <typename T>
__device__ void rope_cos_sin_all(const long long* __restrict__ pos, const T* __restrict__ inv, T* __restrict__ cos_t,
                                 T* __restrict__ sin_t, int tokens, int half, T factor) {
    long long n = (long long)tokens * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n; idx += (long long)gridDim.x * blockDim.x) {
        long long t = idx / half;
        int i = (int)(idx - t * half);
        T angle = (T)pos[t] * inv[i];
        cos_t[idx] = (T)cos((double)angle) * factor;
        sin_t[idx] = (T)sin((double)angle) * factor;
    }
}

extern "C" __global__ void rope_cos_sin_f32(const long long* pos, const float* inv, float* cos_t, float* sin_t,
                                            int tokens, int half, float factor) {
    rope_cos_sin_all<float>(pos, inv, cos_t, sin_t, tokens, half, factor);
}
extern "C" __global__ void rope_cos_sin_f64(const long long* pos, const double* inv, double* cos_t, double* sin_t,
                                            int tokens, int half, double factor) {
    rope_cos_sin_all<double>(pos, inv, cos_t, sin_t, tokens, half, factor);
}
