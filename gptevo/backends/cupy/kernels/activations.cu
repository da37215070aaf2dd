// Elementwise activations and gated units (spec/ops/activations.md; reference gptevo/ops/activations.py).
// Grid-stride loops over n elements (or rows x I for the gated units). Entry points per T in {f32, f64}:
//   silu_T, gelu_T (approximate: 0 = erf form, 1 = tanh form), swiglu_T (separate gate/up arrays),
//   glu_rows_T (rows of h[2I] -> a[I]: kind 0 = swiglu on concatenated [gate | up],
//               kind 1 = clamped swiglu on interleaved gate, linear, gate, linear, ... (gpt-oss)).
#include "common.cuh"

// Overflow-free logistic, as the reference: exp is only taken of -|z|.
template <typename T> __device__ __forceinline__ T sigmoid(T z) {
    T e = r_exp(z >= (T)0 ? -z : z);
    return z >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);
}

template <typename T> __device__ __forceinline__ T clamped_swiglu_one(T gate, T lin, T alpha, T limit) {
    gate = r_min(gate, limit);                          // clamped from above only
    lin = r_min(r_max(lin, -limit), limit);     // np.clip(lin, -limit, limit)
    return gate * sigmoid(alpha * gate) * (lin + (T)1);
}

template <typename T> __device__ void silu_all(const T* __restrict__ x, T* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = x[i] * sigmoid(x[i]);
}

// GELU is evaluated in double and rounded once (the reference does the same).
template <typename T> __device__ void gelu_all(const T* __restrict__ x, T* __restrict__ y, long long n, int approximate) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        double v = (double)x[i];
        double out;
        if (approximate) {
            double inner = 0.7978845608028654 * (v + 0.044715 * v * v * v);   // sqrt(2/pi)
            out = 0.5 * v * (1.0 + tanh(inner));
        } else {
            out = v * (0.5 * erfc(-v / 1.4142135623730951));                 // sqrt(2)
        }
        y[i] = (T)out;
    }
}

template <typename T> __device__ void swiglu_all(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                                                 long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = g[i] * sigmoid(g[i]) * u[i];
}

template <typename T> __device__ void glu_rows_all(const T* __restrict__ h, T* __restrict__ a, long long rows, int inter,
                                                   int kind, T alpha, T limit) {
    long long n = rows * inter;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        long long r = i / inter;
        int j = (int)(i - r * inter);
        const T* hr = h + r * 2 * inter;
        if (kind == 0) {
            T gate = hr[j];
            a[i] = gate * sigmoid(gate) * hr[inter + j];
        } else {
            a[i] = clamped_swiglu_one(hr[2 * j], hr[2 * j + 1], alpha, limit);
        }
    }
}

extern "C" __global__ void silu_f32(const float* x, float* y, long long n) { silu_all<float>(x, y, n); }
extern "C" __global__ void silu_f64(const double* x, double* y, long long n) { silu_all<double>(x, y, n); }
extern "C" __global__ void gelu_f32(const float* x, float* y, long long n, int approximate) {
    gelu_all<float>(x, y, n, approximate);
}
extern "C" __global__ void gelu_f64(const double* x, double* y, long long n, int approximate) {
    gelu_all<double>(x, y, n, approximate);
}
extern "C" __global__ void swiglu_f32(const float* g, const float* u, float* y, long long n) {
    swiglu_all<float>(g, u, y, n);
}
extern "C" __global__ void swiglu_f64(const double* g, const double* u, double* y, long long n) {
    swiglu_all<double>(g, u, y, n);
}
extern "C" __global__ void glu_rows_f32(const float* h, float* a, long long rows, int inter, int kind,
                                        float alpha, float limit) {
    glu_rows_all<float>(h, a, rows, inter, kind, alpha, limit);
}
extern "C" __global__ void glu_rows_f64(const double* h, double* a, long long rows, int inter, int kind,
                                        double alpha, double limit) {
    glu_rows_all<double>(h, a, rows, inter, kind, alpha, limit);
}
