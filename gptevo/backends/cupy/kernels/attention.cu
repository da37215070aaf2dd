// Softmax attention with GQA, causal + sliding-window masks on absolute positions, sinks and ALiBi
// (spec/ops/attention.md; reference gptevo/ops/attention.py):
//   score[h,t,s] = scale * q[t,h] . k[s,g] - slope_h * (qpos_t - kpos_s),   g = h / (H / G)
//   visible iff 0 <= kpos_s <= qpos_t and (window == 0 or kpos_s > qpos_t - window)
//   out[t,h] = sum_s softmax(score[h,t,:], sink_h)_s v[s,g]
// One block per (query t, head h) (blockIdx.x = t * H + h). Each warp takes tiles of 32 keys
// (tiles warp, warp + nwarps, ...): lane i scores key 32*tile + i on its own (q in shared memory,
// 16-byte loads of its key row), then the warp updates an online softmax (running max m, running
// sum l) and its accumulator acc[Dv] in shared memory, lanes splitting the value dims and each
// key's probability broadcast by a shuffle. Finally the warps are merged with the sink. Masked
// keys, and keys whose probability is exactly 0, are skipped. A query that sees no key outputs zeros.
// Dynamic shared memory: (Dh + nwarps * (Dv + 2)) * sizeof(T).
// Entry points: attention_f32, attention_f64 (positions int64; sinks/slopes widened to T).
#include "common.cuh"

template <typename T>
__device__ void attention_one(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const long long* __restrict__ qpos, const long long* __restrict__ kpos,
                              const T* __restrict__ sinks, int has_sinks, const T* __restrict__ slopes,
                              int has_alibi, T* __restrict__ out, int n_q, int heads, int kv_heads, int n_k,
                              int dh, int dv, long long window, T scale, T* smem) {
    int lane = threadIdx.x % GPTEVO_WARP, warp = threadIdx.x / GPTEVO_WARP;
    int nwarps = blockDim.x / GPTEVO_WARP;
    T* qs = smem;                                   // [Dh] the query row
    T* acc = qs + dh;                               // [nwarps, Dv] per-warp accumulators
    T* ml = acc + nwarps * dv;                      // [nwarps, 2] per-warp (m, l)
    int group = heads / kv_heads;
    for (long long blk = blockIdx.x; blk < (long long)n_q * heads; blk += gridDim.x) {
        int t = (int)(blk / heads), h = (int)(blk % heads), g = h / group;
        __syncthreads();                            // smem is reused across grid-stride iterations
        for (int d = threadIdx.x; d < dh; d += blockDim.x) qs[d] = q[((long long)t * heads + h) * dh + d];
        for (int d = threadIdx.x; d < nwarps * dv; d += blockDim.x) acc[d] = (T)0;
        __syncthreads();
        long long qp = qpos[t];
        T slope = has_alibi ? slopes[h] : (T)0;
        T m = r_neg_inf<T>(), l = (T)0;
        T* my_acc = acc + warp * dv;
        constexpr int VEC = 16 / sizeof(T);
        for (int tile = warp; tile * GPTEVO_WARP < n_k; tile += nwarps) {
            int s = tile * GPTEVO_WARP + lane;
            T score = r_neg_inf<T>();
            if (s < n_k) {
                long long kp = kpos[s];
                if (kp >= 0 && kp <= qp && (window == 0 || kp > qp - window)) {
                    const T* ks = k + ((long long)s * kv_heads + g) * dh;
                    T dot = (T)0;
                    if (dh % VEC == 0) {
                        for (int d = 0; d < dh; d += VEC) {
                            T kv[VEC];
                            load_run<T, VEC>(ks + d, kv);
#pragma unroll
                            for (int e = 0; e < VEC; ++e) dot += qs[d + e] * kv[e];
                        }
                    } else {
                        for (int d = 0; d < dh; ++d) dot += qs[d] * ks[d];
                    }
                    score = dot * scale;
                    if (has_alibi) score -= slope * (T)(qp - kp);
                }
            }
            T tile_max = warp_max(score);
            if (tile_max == r_neg_inf<T>()) continue;   // uniform: every key of the tile is masked
            T m_new = r_max(m, tile_max);
            T correction = r_exp(m - m_new);            // exp(-inf) = 0 on the first visible tile
            T p = r_exp(score - m_new);                 // 0 for masked keys
            l = l * correction + warp_sum(p);
            for (int d = lane; d < dv; d += GPTEVO_WARP) my_acc[d] *= correction;
            for (int j = 0; j < GPTEVO_WARP; ++j) {
                T pj = __shfl_sync(GPTEVO_FULL_MASK, p, j);
                if (pj == (T)0) continue;               // uniform across the warp
                const T* vs = v + ((long long)(tile * GPTEVO_WARP + j) * kv_heads + g) * dv;
                for (int d = lane; d < dv; d += GPTEVO_WARP) my_acc[d] += pj * vs[d];
            }
            m = m_new;
        }
        if (lane == 0) { ml[2 * warp] = m; ml[2 * warp + 1] = l; }
        __syncthreads();
        T big = has_sinks ? sinks[h] : r_neg_inf<T>();
        for (int w = 0; w < nwarps; ++w) big = r_max(big, ml[2 * w]);
        T* o = out + ((long long)t * heads + h) * dv;
        if (!r_isfinite(big)) {                     // no visible key and no sink
            for (int d = threadIdx.x; d < dv; d += blockDim.x) o[d] = (T)0;
            continue;
        }
        T denom = has_sinks ? r_exp(sinks[h] - big) : (T)0;
        for (int w = 0; w < nwarps; ++w) denom += ml[2 * w + 1] * r_exp(ml[2 * w] - big);
        for (int d = threadIdx.x; d < dv; d += blockDim.x) {
            T num = (T)0;
            for (int w = 0; w < nwarps; ++w) num += acc[w * dv + d] * r_exp(ml[2 * w] - big);
            o[d] = denom > (T)0 ? num / denom : (T)0;
        }
    }
}

extern "C" __global__ void attention_f32(const float* q, const float* k, const float* v, const long long* qpos,
                                         const long long* kpos, const float* sinks, int has_sinks,
                                         const float* slopes, int has_alibi, float* out, int n_q, int heads,
                                         int kv_heads, int n_k, int dh, int dv, long long window, float scale) {
    extern __shared__ float smem_f32[];
    attention_one<float>(q, k, v, qpos, kpos, sinks, has_sinks, slopes, has_alibi, out, n_q, heads, kv_heads,
                         n_k, dh, dv, window, scale, smem_f32);
}
extern "C" __global__ void attention_f64(const double* q, const double* k, const double* v, const long long* qpos,
                                         const long long* kpos, const double* sinks, int has_sinks,
                                         const double* slopes, int has_alibi, double* out, int n_q, int heads,
                                         int kv_heads, int n_k, int dh, int dv, long long window, double scale) {
    extern __shared__ double smem_f64[];
    attention_one<double>(q, k, v, qpos, kpos, sinks, has_sinks, slopes, has_alibi, out, n_q, heads, kv_heads,
                          n_k, dh, dv, window, scale, smem_f64);
}
