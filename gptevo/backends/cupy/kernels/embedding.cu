// Embedding row gather with exact widening (spec/ops/embedding.md; reference gptevo/ops/embedding.py).
// out[t, :] = table[ids[t], :]; ids are int64 and were range-checked by the wrapper. Values move
// as raw bits (no floating-point instruction, so flush-to-zero never touches a subnormal entry):
//   embedding_u32: f32 table -> f32 bits        embedding_u64: f64 table -> f64 bits
//   embedding_bf16: bf16 bits -> f32 bits       embedding_f16: f16 bits -> f32 bits
// One thread per output element (grid-stride).
#include "common.cuh"

extern "C" __global__ void embedding_u32(const unsigned int* table, const long long* ids, unsigned int* out,
                                         long long tokens, int d) {
    long long n = tokens * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = table[ids[i / d] * d + i % d];
}
extern "C" __global__ void embedding_u64(const unsigned long long* table, const long long* ids,
                                         unsigned long long* out, long long tokens, int d) {
    long long n = tokens * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = table[ids[i / d] * d + i % d];
}
extern "C" __global__ void embedding_bf16(const unsigned short* table, const long long* ids, unsigned int* out,
                                          long long tokens, int d) {
    long long n = tokens * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = bf16_bits_to_f32_bits(table[ids[i / d] * d + i % d]);
}
extern "C" __global__ void embedding_f16(const unsigned short* table, const long long* ids, unsigned int* out,
                                         long long tokens, int d) {
    long long n = tokens * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = f16_bits_to_f32_bits(table[ids[i / d] * d + i % d]);
}
