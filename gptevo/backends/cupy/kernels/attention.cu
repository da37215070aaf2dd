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

// ---- split-K decode attention (few queries over many keys) -------------------------------------------
// attention_split: one block per (query t, KV head g) and split of the keys (blockIdx.y of splits):
// the G query heads of the group share each key and value row read. Lane i of a warp scores key
// 32*tile + i against every head of the group (q rows in shared memory), the warp keeps one online
// softmax per head (m, l in registers) and its accumulator in registers (lane owns dims lane + 32c);
// the block's warps are merged into the split's partial result:
//   part_o[t, h, split, :] = sum_s exp(score - M) v_s (unnormalized), part_ml[t, h, split] = (M, L),
// with M = -inf, L = 0 and part_o = 0 when the split sees no key. attention_merge then combines the
// splits with the sink (one warp per (t, h)); a query that sees no key and has no sink gets zeros.
// Limits (checked by the wrapper): H / G <= ATTN_MAX_GROUP, Dh, Dv <= ATTN_MAX_DH, Dh % 4 == 0;
// blockDim.x = 32 * ATTN_SPLIT_WARPS. Entry points: attention_split_{f32,f64}, attention_merge_{f32,f64}.
#define ATTN_MAX_GROUP 8
#define ATTN_MAX_DH 128
#define ATTN_SPLIT_WARPS 4
#define ATTN_DPL (ATTN_MAX_DH / GPTEVO_WARP)

__device__ __forceinline__ int warp_any(int v) {      // butterfly OR over the full warp
    for (int off = GPTEVO_WARP / 2; off > 0; off >>= 1) v |= __shfl_xor_sync(GPTEVO_FULL_MASK, v, off);
    return v;
}

template <typename T>
__device__ void attention_split_one(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                    const long long* __restrict__ qpos, const long long* __restrict__ kpos,
                                    const T* __restrict__ slopes, int has_alibi, T* __restrict__ part_o,
                                    T* __restrict__ part_ml, int heads, int kv_heads, int n_k, int dh, int dv,
                                    long long window, T scale, int splits, T* qs, T* wml, T* wacc) {
    int lane = threadIdx.x % GPTEVO_WARP, warp = threadIdx.x / GPTEVO_WARP;
    int group = heads / kv_heads;
    int t = blockIdx.x / kv_heads, g = blockIdx.x % kv_heads, split = blockIdx.y;
    int chunk = (n_k + splits - 1) / splits;
    int s0 = split * chunk, s1 = n_k < s0 + chunk ? n_k : s0 + chunk;
    for (int i = threadIdx.x; i < group * dh; i += blockDim.x)
        qs[i] = q[((long long)t * heads + (long long)g * group) * dh + i];
    __syncthreads();
    long long qp = qpos[t];
    T m[ATTN_MAX_GROUP], l[ATTN_MAX_GROUP], acc[ATTN_MAX_GROUP][ATTN_DPL], slope[ATTN_MAX_GROUP];
#pragma unroll
    for (int j = 0; j < ATTN_MAX_GROUP; ++j) {
        m[j] = r_neg_inf<T>();
        l[j] = (T)0;
        slope[j] = (has_alibi && j < group) ? slopes[g * group + j] : (T)0;
#pragma unroll
        for (int c = 0; c < ATTN_DPL; ++c) acc[j][c] = (T)0;
    }
    for (int base = s0 + warp * GPTEVO_WARP; base < s1; base += ATTN_SPLIT_WARPS * GPTEVO_WARP) {
        int s = base + lane;
        bool visible = false;
        long long kp = 0;
        if (s < s1) {
            kp = kpos[s];
            visible = kp >= 0 && kp <= qp && (window == 0 || kp > qp - window);
        }
        if (!warp_any((int)visible)) continue;     // uniform
        T score[ATTN_MAX_GROUP];
#pragma unroll
        for (int j = 0; j < ATTN_MAX_GROUP; ++j) score[j] = (T)0;
        if (visible) {
            const T* ks = k + ((long long)s * kv_heads + g) * dh;
            for (int d = 0; d < dh; d += 4) {
                T kv[4];
                load_run<T, 4>(ks + d, kv);
#pragma unroll
                for (int j = 0; j < ATTN_MAX_GROUP; ++j) {
                    if (j < group) {
                        const T* qj = qs + j * dh + d;
                        score[j] += qj[0] * kv[0] + qj[1] * kv[1] + qj[2] * kv[2] + qj[3] * kv[3];
                    }
                }
            }
        }
        T p[ATTN_MAX_GROUP];
#pragma unroll
        for (int j = 0; j < ATTN_MAX_GROUP; ++j) {
            p[j] = (T)0;
            if (j >= group) continue;                               // uniform
            T sc = visible ? score[j] * scale - (has_alibi ? slope[j] * (T)(qp - kp) : (T)0) : r_neg_inf<T>();
            T m_new = r_max(m[j], warp_max(sc));
            if (m_new == r_neg_inf<T>()) continue;                  // uniform
            T correction = r_exp(m[j] - m_new);
            p[j] = r_exp(sc - m_new);
            l[j] = l[j] * correction + warp_sum(p[j]);
#pragma unroll
            for (int c = 0; c < ATTN_DPL; ++c) acc[j][c] *= correction;
            m[j] = m_new;
        }
        int n_tile = s1 - base < GPTEVO_WARP ? s1 - base : GPTEVO_WARP;
        for (int jj = 0; jj < n_tile; ++jj) {
            int any = __shfl_sync(GPTEVO_FULL_MASK, (int)visible, jj);
            if (!any) continue;                                     // uniform
            const T* vs = v + ((long long)(base + jj) * kv_heads + g) * dv;
            T val[ATTN_DPL];
#pragma unroll
            for (int c = 0; c < ATTN_DPL; ++c) {
                int d = lane + c * GPTEVO_WARP;
                val[c] = d < dv ? vs[d] : (T)0;
            }
#pragma unroll
            for (int j = 0; j < ATTN_MAX_GROUP; ++j) {
                T pj = __shfl_sync(GPTEVO_FULL_MASK, p[j], jj);
#pragma unroll
                for (int c = 0; c < ATTN_DPL; ++c) acc[j][c] += pj * val[c];
            }
        }
    }
    // per-warp state to shared memory: wml [warps, group, 2], wacc [warps, group, dv]
#pragma unroll
    for (int j = 0; j < ATTN_MAX_GROUP; ++j) {
        if (j >= group) continue;
        if (lane == 0) { wml[(warp * group + j) * 2] = m[j]; wml[(warp * group + j) * 2 + 1] = l[j]; }
#pragma unroll
        for (int c = 0; c < ATTN_DPL; ++c) {
            int d = lane + c * GPTEVO_WARP;
            if (d < dv) wacc[(warp * group + j) * dv + d] = acc[j][c];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * dv; i += blockDim.x) {
        int j = i / dv, d = i - j * dv;
        T big = r_neg_inf<T>();
        for (int w = 0; w < ATTN_SPLIT_WARPS; ++w) big = r_max(big, wml[(w * group + j) * 2]);
        T o = (T)0, lsum = (T)0;
        if (big != r_neg_inf<T>()) {
            for (int w = 0; w < ATTN_SPLIT_WARPS; ++w) {
                T mw = wml[(w * group + j) * 2];
                if (mw == r_neg_inf<T>()) continue;
                T f = r_exp(mw - big);
                o += wacc[(w * group + j) * dv + d] * f;
                lsum += wml[(w * group + j) * 2 + 1] * f;
            }
        }
        long long row = ((long long)t * heads + (long long)g * group + j) * splits + split;
        part_o[row * dv + d] = o;
        if (d == 0) { part_ml[row * 2] = big; part_ml[row * 2 + 1] = lsum; }
    }
}

template <typename T>
__device__ void attention_merge_all(const T* __restrict__ part_o, const T* __restrict__ part_ml,
                                    const T* __restrict__ sinks, int has_sinks, T* __restrict__ out, int rows,
                                    int heads, int dv, int splits) {
    int lane = threadIdx.x % GPTEVO_WARP;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        int h = r % heads;
        const T* ml = part_ml + (long long)r * splits * 2;
        T big = has_sinks ? sinks[h] : r_neg_inf<T>();
        for (int s = 0; s < splits; ++s) big = r_max(big, ml[2 * s]);
        T* o = out + (long long)r * dv;
        if (!r_isfinite(big)) {
            for (int d = lane; d < dv; d += GPTEVO_WARP) o[d] = (T)0;
            continue;
        }
        T denom = has_sinks ? r_exp(sinks[h] - big) : (T)0;
        for (int s = 0; s < splits; ++s)
            if (ml[2 * s] != r_neg_inf<T>()) denom += ml[2 * s + 1] * r_exp(ml[2 * s] - big);
        for (int d = lane; d < dv; d += GPTEVO_WARP) {
            T num = (T)0;
            for (int s = 0; s < splits; ++s)
                if (ml[2 * s] != r_neg_inf<T>()) num += part_o[((long long)r * splits + s) * dv + d] * r_exp(ml[2 * s] - big);
            o[d] = denom > (T)0 ? num / denom : (T)0;
        }
    }
}

extern "C" __global__ void attention_split_f32(const float* q, const float* k, const float* v, const long long* qpos,
                                               const long long* kpos, const float* sinks, int has_sinks,
                                               const float* slopes, int has_alibi, float* part_o, float* part_ml,
                                               int n_q, int heads, int kv_heads, int n_k, int dh, int dv,
                                               long long window, float scale, int splits) {
    __shared__ float qs_f32[ATTN_MAX_GROUP * ATTN_MAX_DH];
    __shared__ float wml_f32[ATTN_SPLIT_WARPS * ATTN_MAX_GROUP * 2];
    __shared__ float wacc_f32[ATTN_SPLIT_WARPS * ATTN_MAX_GROUP * ATTN_MAX_DH];
    attention_split_one<float>(q, k, v, qpos, kpos, slopes, has_alibi, part_o, part_ml, heads, kv_heads, n_k, dh,
                               dv, window, scale, splits, qs_f32, wml_f32, wacc_f32);
}
extern "C" __global__ void attention_split_f64(const double* q, const double* k, const double* v,
                                               const long long* qpos, const long long* kpos, const double* sinks,
                                               int has_sinks, const double* slopes, int has_alibi, double* part_o,
                                               double* part_ml, int n_q, int heads, int kv_heads, int n_k, int dh,
                                               int dv, long long window, double scale, int splits) {
    __shared__ double qs_f64[ATTN_MAX_GROUP * ATTN_MAX_DH];
    __shared__ double wml_f64[ATTN_SPLIT_WARPS * ATTN_MAX_GROUP * 2];
    __shared__ double wacc_f64[ATTN_SPLIT_WARPS * ATTN_MAX_GROUP * ATTN_MAX_DH];
    attention_split_one<double>(q, k, v, qpos, kpos, slopes, has_alibi, part_o, part_ml, heads, kv_heads, n_k, dh,
                                dv, window, scale, splits, qs_f64, wml_f64, wacc_f64);
}
extern "C" __global__ void attention_merge_f32(const float* part_o, const float* part_ml, const float* sinks,
                                               int has_sinks, float* out, int rows, int heads, int dv, int splits) {
    attention_merge_all<float>(part_o, part_ml, sinks, has_sinks, out, rows, heads, dv, splits);
}
extern "C" __global__ void attention_merge_f64(const double* part_o, const double* part_ml, const double* sinks,
                                               int has_sinks, double* out, int rows, int heads, int dv, int splits) {
    attention_merge_all<double>(part_o, part_ml, sinks, has_sinks, out, rows, heads, dv, splits);
}
