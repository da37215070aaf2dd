// RMSNorm and LayerNorm over the last axis (spec/ops/norms.md; reference gptevo/ops/norms.py).
// One block per row; blockDim.x a multiple of 32. weight/bias arrive already widened to T by the
// wrapper (they are small vectors). Entry points: {rms,layer}_norm_{f32,f64}.
#include "common.cuh"

// y = x / sqrt(mean(x^2) + eps) * (offset + w)
template <typename T>
__device__ void rms_norm_row(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                             int rows, int d, T eps, T offset) {
    __shared__ T scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (long long)row * d;
        T* yr = y + (long long)row * d;
        T acc = (T)0;
        for (int i = threadIdx.x; i < d; i += blockDim.x) acc += xr[i] * xr[i];
        T mean_sq = block_sum(acc, scratch) / (T)d;
        T denom = r_sqrt(mean_sq + eps);
        for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = xr[i] / denom * (offset + w[i]);
    }
}

// y = (x - mean) / sqrt(var + eps) * w + b, var the biased variance (two passes)
template <typename T>
__device__ void layer_norm_row(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                               int has_bias, T* __restrict__ y, int rows, int d, T eps) {
    __shared__ T scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (long long)row * d;
        T* yr = y + (long long)row * d;
        T acc = (T)0;
        for (int i = threadIdx.x; i < d; i += blockDim.x) acc += xr[i];
        T mean = block_sum(acc, scratch) / (T)d;
        T acc2 = (T)0;
        for (int i = threadIdx.x; i < d; i += blockDim.x) { T c = xr[i] - mean; acc2 += c * c; }
        T var = block_sum(acc2, scratch) / (T)d;
        T denom = r_sqrt(var + eps);
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            T v = (xr[i] - mean) / denom * w[i];
            yr[i] = has_bias ? v + b[i] : v;
        }
    }
}

extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* y, int rows, int d,
                                        float eps, float offset) {
    rms_norm_row<float>(x, w, y, rows, d, eps, offset);
}
extern "C" __global__ void rms_norm_f64(const double* x, const double* w, double* y, int rows, int d,
                                        double eps, double offset) {
    rms_norm_row<double>(x, w, y, rows, d, eps, offset);
}
extern "C" __global__ void layer_norm_f32(const float* x, const float* w, const float* b, int has_bias,
                                          float* y, int rows, int d, float eps) {
    layer_norm_row<float>(x, w, b, has_bias, y, rows, d, eps);
}
extern "C" __global__ void layer_norm_f64(const double* x, const double* w, const double* b, int has_bias,
                                          double* y, int rows, int d, double eps) {
    layer_norm_row<double>(x, w, b, has_bias, y, rows, d, eps);
}
