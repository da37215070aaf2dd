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
