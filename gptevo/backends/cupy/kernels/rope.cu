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
