// MoE combine (spec/ops/moe.md; reference gptevo/ops/moe.py moe_combine):
//   out[t, d] = sum_j weights[t, j] * y[t, j, d], summed over the k slots in order.
// The expert projections themselves run through linear.cu's grouped_linear (one pair per
// (token, slot), eid = the routed expert) and activations.cu's glu_rows; the expert bias is added
// there, so it is scaled by the routing weight here (gpt-oss). One thread per output element.
// Entry points: moe_combine_f32, moe_combine_f64.
#include "common.cuh"

template <typename T>
__device__ void moe_combine_all(const T* __restrict__ y, const T* __restrict__ w, T* __restrict__ out,
                                long long tokens, int k, int d) {
    long long n = tokens * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        long long t = i / d;
        int c = (int)(i - t * d);
        T acc = (T)0;
        for (int j = 0; j < k; ++j) acc += w[t * k + j] * y[(t * k + j) * d + c];
        out[i] = acc;
    }
}

extern "C" __global__ void moe_combine_f32(const float* y, const float* w, float* out, long long tokens, int k, int d) {
    moe_combine_all<float>(y, w, out, tokens, k, d);
}
extern "C" __global__ void moe_combine_f64(const double* y, const double* w, double* out, long long tokens, int k,
                                           int d) {
    moe_combine_all<double>(y, w, out, tokens, k, d);
}
