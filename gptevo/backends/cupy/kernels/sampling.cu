// Token sampling on the device (gptevo/generation.py sample_token, same rules, one block):
//   temperature == 0: greedy, the first maximum (lowest id);
//   else w_i = exp(z_i / temperature - z_max / temperature) in double;
//   top_k in (0, V): keep the k largest logits, equal logits to the lower ids;
//   top_p < 1: of those, keep the smallest prefix in (logit descending, id ascending) order whose
//              weight reaches top_p of their total;
//   draw: the first kept id, in ascending id order, whose cumulative weight exceeds u * total.
// Thresholds are found by bisection on the order-preserving 32-bit key of the float32 logit (no
// sort): 32 block-wide counts (top-k) or sums (top-p) over the row; ties at a threshold are cut in
// ascending id order by a block scan. Each thread owns one contiguous run of ids.
// out[0] = the token (-1 when a logit is not finite), out[1] = the first non-finite index or -1.
// One block; blockDim.x a multiple of 32, <= SAMPLE_MAX_THREADS. Entry point: sample_f32.
#include "common.cuh"

#define SAMPLE_MAX_THREADS 1024

__device__ __forceinline__ unsigned int sample_key(float f) {       // larger float -> larger key
    unsigned int b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct SumOp { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };
struct MinOp { template <typename T> __device__ T operator()(T a, T b) const { return b < a ? b : a; } };
struct MaxOp { template <typename T> __device__ T operator()(T a, T b) const { return a < b ? b : a; } };

// Block-wide reduction; every thread calls it and gets the result.
template <typename T, typename Op> __device__ T block_reduce(T v, T* scratch, Op op) {
    int lane = threadIdx.x % GPTEVO_WARP, warp = threadIdx.x / GPTEVO_WARP;
    int nwarps = blockDim.x / GPTEVO_WARP;
    for (int off = GPTEVO_WARP / 2; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(GPTEVO_FULL_MASK, v, off));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = scratch[0];
    for (int w = 1; w < nwarps; ++w) r = op(r, scratch[w]);
    return r;
}

struct Row {
    const float* z;
    int n, lo, hi;                 // this thread's ids: [lo, hi)
    double inv_t, shift;           // w_i = exp(z_i * ... ): exp(z_i / temperature - shift)
    int use_k, use_p;
    unsigned int kkey, pkey;       // thresholds: keep key > *key, and ties at *key with id <= *tie
    long long ktie, ptie;
    __device__ unsigned int key(int i) const { return sample_key(z[i]); }
    __device__ double w(int i) const { return exp((double)z[i] / inv_t - shift); }
    __device__ bool kept_k(int i) const {
        if (!use_k) return true;
        unsigned int c = key(i);
        return c > kkey || (c == kkey && i <= ktie);
    }
    __device__ bool kept(int i) const {
        if (!kept_k(i)) return false;
        if (!use_p) return true;
        unsigned int c = key(i);
        return c > pkey || (c == pkey && i <= ptie);
    }
};

// The id of the need-th (1-based) id, in ascending order, with pred(i); n when there are fewer.
template <typename Pred>
__device__ long long nth_match(const Row& row, Pred pred, long long need, long long* prefix, long long* lscratch) {
    long long local = 0;
    for (int i = row.lo; i < row.hi; ++i) local += pred(i) ? 1 : 0;
    __syncthreads();
    prefix[threadIdx.x] = local;
    __syncthreads();
    if (threadIdx.x == 0) {
        long long run = 0;
        for (int t = 0; t < (int)blockDim.x; ++t) { long long c = prefix[t]; prefix[t] = run; run += c; }
    }
    __syncthreads();
    long long base = prefix[threadIdx.x], found = row.n;
    if (base < need && base + local >= need) {
        long long run = base;
        for (int i = row.lo; i < row.hi; ++i) {
            if (pred(i) && ++run == need) { found = i; break; }
        }
    }
    return block_reduce(found, lscratch, MinOp());
}

// The first id, in ascending order, with pred(i) where the running sum of w over such ids is
// > thr (strict) or >= thr; n when none is.
template <typename Pred>
__device__ long long first_cum(const Row& row, Pred pred, double thr, int strict, double* prefix,
                               long long* lscratch) {
    double local = 0.0;
    for (int i = row.lo; i < row.hi; ++i) if (pred(i)) local += row.w(i);
    __syncthreads();
    prefix[threadIdx.x] = local;
    __syncthreads();
    if (threadIdx.x == 0) {
        double run = 0.0;
        for (int t = 0; t < (int)blockDim.x; ++t) { double c = prefix[t]; prefix[t] = run; run += c; }
    }
    __syncthreads();
    double base = prefix[threadIdx.x];
    long long found = row.n;
    bool starts = strict ? base <= thr : base < thr;
    bool ends = strict ? base + local > thr : base + local >= thr;
    if (starts && ends) {
        double run = base;
        for (int i = row.lo; i < row.hi; ++i) {
            if (!pred(i)) continue;
            run += row.w(i);
            if (strict ? run > thr : run >= thr) { found = i; break; }
        }
    }
    return block_reduce(found, lscratch, MinOp());
}

struct KeepK { const Row* r; __device__ bool operator()(int i) const { return r->kept_k(i); } };
struct Kept { const Row* r; __device__ bool operator()(int i) const { return r->kept(i); } };
struct TieK { const Row* r; __device__ bool operator()(int i) const { return r->key(i) == r->kkey; } };
struct TieP {
    const Row* r;
    __device__ bool operator()(int i) const { return r->kept_k(i) && r->key(i) == r->pkey; }
};

extern "C" __global__ void sample_f32(const float* z, int n, double temperature, int top_k, double top_p, double u,
                                      long long* out) {
    __shared__ double dscratch[GPTEVO_WARP];
    __shared__ long long lscratch[GPTEVO_WARP];
    __shared__ unsigned long long uscratch[GPTEVO_WARP];
    __shared__ double dprefix[SAMPLE_MAX_THREADS];
    __shared__ long long lprefix[SAMPLE_MAX_THREADS];
    int chunk = (n + (int)blockDim.x - 1) / (int)blockDim.x;
    Row row;
    row.z = z;
    row.n = n;
    row.lo = (int)threadIdx.x * chunk < n ? (int)threadIdx.x * chunk : n;
    row.hi = row.lo + chunk < n ? row.lo + chunk : n;
    row.use_k = row.use_p = 0;
    row.kkey = row.pkey = 0u;
    row.ktie = row.ptie = n;

    long long bad = n;
    for (int i = row.lo; i < row.hi; ++i) if (!r_isfinite(z[i])) { bad = i; break; }
    bad = block_reduce(bad, lscratch, MinOp());
    if (bad < n) {                                          // uniform
        if (threadIdx.x == 0) { out[0] = -1; out[1] = bad; }
        return;
    }
    // (key, ~id): the maximum is the largest logit at its lowest id
    unsigned long long best = 0ull;
    for (int i = row.lo; i < row.hi; ++i) {
        unsigned long long c = ((unsigned long long)row.key(i) << 32) | (unsigned long long)(0xffffffffu - (unsigned int)i);
        best = c > best ? c : best;
    }
    best = block_reduce(best, uscratch, MaxOp());
    int argmax = (int)(0xffffffffu - (unsigned int)(best & 0xffffffffull));
    if (temperature == 0.0) {                              // uniform
        if (threadIdx.x == 0) { out[0] = argmax; out[1] = -1; }
        return;
    }
    row.inv_t = temperature;
    row.shift = (double)z[argmax] / temperature;

    if (top_k > 0 && top_k < n) {                          // the k-th largest key, by bisection
        unsigned long long lo = 0ull, hi = 0xffffffffull;  // count(key >= lo) >= top_k holds throughout
        while (lo < hi) {
            unsigned long long mid = lo + (hi - lo + 1) / 2;
            long long c = 0;
            for (int i = row.lo; i < row.hi; ++i) c += row.key(i) >= (unsigned int)mid ? 1 : 0;
            if (block_reduce(c, lscratch, SumOp()) >= top_k) lo = mid; else hi = mid - 1;
        }
        row.kkey = (unsigned int)lo;
        long long above = 0;
        for (int i = row.lo; i < row.hi; ++i) above += row.key(i) > row.kkey ? 1 : 0;
        above = block_reduce(above, lscratch, SumOp());
        row.use_k = 1;
        row.ktie = nth_match(row, TieK{&row}, (long long)top_k - above, lprefix, lscratch);
    }
    if (top_p < 1.0) {                                     // the nucleus threshold, by bisection
        double total = 0.0;
        for (int i = row.lo; i < row.hi; ++i) if (row.kept_k(i)) total += row.w(i);
        total = block_reduce(total, dscratch, SumOp());
        double target = top_p * total;
        unsigned long long lo = 0ull, hi = 0xffffffffull;  // sum(w | key >= lo) >= target holds throughout
        while (lo < hi) {
            unsigned long long mid = lo + (hi - lo + 1) / 2;
            double s = 0.0;
            for (int i = row.lo; i < row.hi; ++i) if (row.kept_k(i) && row.key(i) >= (unsigned int)mid) s += row.w(i);
            if (block_reduce(s, dscratch, SumOp()) >= target) lo = mid; else hi = mid - 1;
        }
        row.pkey = (unsigned int)lo;
        double above = 0.0;
        for (int i = row.lo; i < row.hi; ++i) if (row.kept_k(i) && row.key(i) > row.pkey) above += row.w(i);
        above = block_reduce(above, dscratch, SumOp());
        row.use_p = 1;
        row.ptie = first_cum(row, TieP{&row}, target - above, 0, dprefix, lscratch);
    }
    double kept_total = 0.0;
    long long last = -1;
    for (int i = row.lo; i < row.hi; ++i) if (row.kept(i)) { kept_total += row.w(i); last = i; }
    kept_total = block_reduce(kept_total, dscratch, SumOp());
    last = block_reduce(last, lscratch, MaxOp());
    long long token = first_cum(row, Kept{&row}, u * kept_total, 1, dprefix, lscratch);
    if (threadIdx.x == 0) { out[0] = token < n ? token : last; out[1] = -1; }
}
