// Embedding row gather with exact widening (spec/ops/embedding.md; reference gptevo/ops/embedding.py).
// out[t, :] = table[ids[t], :]; ids are int64 (range-checked by the wrapper when they come from the host;
// device ids are trusted, and one outside [0, rows) gives a row of NaN instead of a read out of bounds). Values move
// as raw bits (no floating-point instruction, so flush-to-zero never touches a subnormal entry):
//   embedding_u32: f32 table -> f32 bits        embedding_u64: f64 table -> f64 bits
//   embedding_bf16: bf16 bits -> f32 bits       embedding_f16: f16 bits -> f32 bits
// One thread per output element (grid-stride).
#include "common.cuh"

extern "C" __global__ void embedding_u32(const unsigned int* table, const long long* ids, unsigned int* out,
                                         long long tokens, int d, long long rows) {
    long long n = tokens * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        { long long id = ids[i / d]; out[i] = (id >= 0 && id < rows) ? table[id * d + i % d] : 0x7fc00000u; }
}
extern "C" __global__ void embedding_u64(const unsigned long long* table, const long long* ids,
                                         unsigned long long* out, long long tokens, int d, long long rows) {
    long long n = tokens * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        { long long id = ids[i / d]; out[i] = (id >= 0 && id < rows) ? table[id * d + i % d] : 0x7ff8000000000000ull; }
}
extern "C" __global__ void embedding_bf16(const unsigned short* table, const long long* ids, unsigned int* out,
                                          long long tokens, int d, long long rows) {
    long long n = tokens * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        { long long id = ids[i / d]; out[i] = (id >= 0 && id < rows) ? bf16_bits_to_f32_bits(table[id * d + i % d]) : 0x7fc00000u; }
}
extern "C" __global__ void embedding_f16(const unsigned short* table, const long long* ids, unsigned int* out,
                                         long long tokens, int d, long long rows) {
    long long n = tokens * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        { long long id = ids[i / d]; out[i] = (id >= 0 && id < rows) ? f16_bits_to_f32_bits(table[id * d + i % d]) : 0x7fc00000u; }
}

// KV cache store for one new position per call (gptevo/kv_cache.py, device path): the slot is read
// from the device, slot = pos[0] % slots, so the same launch serves every decode step (and a captured
// CUDA graph): K[slot, :] = k_new[0, :], V[slot, :] = v_new[0, :], P[slot] = pos[0]. Values move as
// raw 32- or 64-bit words. One thread per element of a [G * Dh] row (grid-stride).
extern "C" __global__ void kv_store_u32(unsigned int* keys, unsigned int* values, long long* positions,
                                        const unsigned int* k_new, const unsigned int* v_new,
                                        const long long* pos, long long slots, int row) {
    long long p = pos[0];
    long long slot = p % slots;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < row; i += gridDim.x * blockDim.x) {
        keys[slot * row + i] = k_new[i];
        values[slot * row + i] = v_new[i];
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) positions[slot] = p;
}
extern "C" __global__ void kv_store_u64(unsigned long long* keys, unsigned long long* values, long long* positions,
                                        const unsigned long long* k_new, const unsigned long long* v_new,
                                        const long long* pos, long long slots, int row) {
    long long p = pos[0];
    long long slot = p % slots;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < row; i += gridDim.x * blockDim.x) {
        keys[slot * row + i] = k_new[i];
        values[slot * row + i] = v_new[i];
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) positions[slot] = p;
}
