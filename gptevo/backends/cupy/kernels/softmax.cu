// Softmax over the last axis with optional sinks (spec/ops/attention.md; reference gptevo/ops/softmax.py):
//   m = max(max_j x_j, sink); m = 0 when not finite;  p_j = exp(x_j - m) / (sum_k exp(x_k - m) + exp(sink - m))
// with the denominator replaced by 1 when it is 0 (all-masked rows give zeros). One block per row;
// blockDim.x a multiple of 32. sinks (one per row, widened to T) only when has_sink.
// Entry points: softmax_f32, softmax_f64.
#include "common.cuh"

template <typename T>
__device__ void softmax_rows(const T* __restrict__ x, const T* __restrict__ sinks, int has_sink,
                             T* __restrict__ y, int rows, int s) {
    __shared__ T scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (long long)row * s;
        T* yr = y + (long long)row * s;
        T m = r_neg_inf<T>();
        for (int j = threadIdx.x; j < s; j += blockDim.x) m = r_max(m, xr[j]);
        m = block_max(m, scratch);
        if (has_sink) m = r_max(m, sinks[row]);
        if (!r_isfinite(m)) m = (T)0;
        T acc = (T)0;
        for (int j = threadIdx.x; j < s; j += blockDim.x) acc += r_exp(xr[j] - m);
        T denom = block_sum(acc, scratch);
        if (has_sink) denom += r_exp(sinks[row] - m);
        if (!(denom > (T)0)) denom = (T)1;
        for (int j = threadIdx.x; j < s; j += blockDim.x) yr[j] = r_exp(xr[j] - m) / denom;
    }
}

extern "C" __global__ void softmax_f32(const float* x, const float* sinks, int has_sink, float* y, int rows, int s) {
    softmax_rows<float>(x, sinks, has_sink, y, rows, s);
}
extern "C" __global__ void softmax_f64(const double* x, const double* sinks, int has_sink, double* y, int rows,
                                       int s) {
    softmax_rows<double>(x, sinks, has_sink, y, rows, s);
}
