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

// MoE routing on the device (reference gptevo/ops/moe.py moe_route): one warp per token row.
// k rounds of a warp arg-max over the experts not yet chosen (larger logit first, equal logits to the
// lower expert id; NaN ranks below every number), then the weights:
//   softmax_all = 1 (order "softmax_topk"): exp(z_j - max) / sum over all E, renormalized over the
//                  k chosen when renorm = 1;
//   softmax_all = 0 (order "topk_softmax"): softmax over the k chosen logits only.
// weights [T, k] (T), ids [T, k] (int64), both in descending weight order. k <= ROUTE_MAX_K.
// blockDim.x = 32. Entry points: moe_route_f32, moe_route_f64.
#define ROUTE_MAX_K 32

template <typename T> __device__ __forceinline__ bool route_better(T a, int ia, T b, int ib, int none) {
    // is (a, ia) ranked before (b, ib)? none = "no candidate" index
    if (ia == none) return false;
    if (ib == none) return true;
    bool an = a != a, bn = b != b;
    if (an != bn) return bn;                        // a number ranks before NaN
    if (!an && a != b) return a > b;
    return ia < ib;
}

template <typename T>
__device__ void moe_route_rows(const T* __restrict__ logits, T* __restrict__ weights, long long* __restrict__ ids,
                               int tokens, int n_exp, int k, int softmax_all, int renorm) {
    int lane = threadIdx.x % GPTEVO_WARP;
    for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
        const T* z = logits + (long long)t * n_exp;
        int chosen[ROUTE_MAX_K];
        T mine_w = (T)0;                              // lane r < k keeps the weight of slot r
        int mine_id = 0;
        for (int r = 0; r < k; ++r) {
            T best = (T)0;
            int bi = n_exp;
            for (int e = lane; e < n_exp; e += GPTEVO_WARP) {
                bool taken = false;
                for (int c = 0; c < r; ++c) taken = taken || chosen[c] == e;
                if (!taken && route_better(z[e], e, best, bi, n_exp)) { best = z[e]; bi = e; }
            }
            for (int off = GPTEVO_WARP / 2; off > 0; off >>= 1) {
                T ob = __shfl_xor_sync(GPTEVO_FULL_MASK, best, off);
                int oi = __shfl_xor_sync(GPTEVO_FULL_MASK, bi, off);
                if (route_better(ob, oi, best, bi, n_exp)) { best = ob; bi = oi; }
            }
            chosen[r] = bi;
            if (lane == r) mine_id = bi;
        }
        T top = z[chosen[0]];
        T denom = (T)0;
        if (softmax_all) {
            for (int e = lane; e < n_exp; e += GPTEVO_WARP) denom += r_exp(z[e] - top);
            denom = warp_sum(denom);
        } else {
            for (int r = 0; r < k; ++r) denom += r_exp(z[chosen[r]] - top);
        }
        if (lane < k) mine_w = r_exp(z[mine_id] - top) / denom;
        if (softmax_all && renorm) {
            T sum = warp_sum(lane < k ? mine_w : (T)0);
            mine_w = mine_w / sum;
        }
        if (lane < k) {
            weights[(long long)t * k + lane] = mine_w;
            ids[(long long)t * k + lane] = mine_id;
        }
    }
}

extern "C" __global__ void moe_route_f32(const float* logits, float* weights, long long* ids, int tokens, int n_exp,
                                         int k, int softmax_all, int renorm) {
    moe_route_rows<float>(logits, weights, ids, tokens, n_exp, k, softmax_all, renorm);
}
extern "C" __global__ void moe_route_f64(const double* logits, double* weights, long long* ids, int tokens,
                                         int n_exp, int k, int softmax_all, int renorm) {
    moe_route_rows<double>(logits, weights, ids, tokens, n_exp, k, softmax_all, renorm);
}
