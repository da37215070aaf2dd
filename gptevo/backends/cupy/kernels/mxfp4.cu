// MXFP4 decode (spec/ops/mxfp4.md; reference gptevo/ops/mxfp4.py), bit-exact.
// blocks: u8 [n_groups, 16] (byte j: low nibble = element 2j, high nibble = element 2j+1);
// scales: u8 [n_groups] (E8M0). Output as raw bits, u32 (float32) or u64 (float64) [n_groups, 32],
// so that no floating-point instruction (and so no flush-to-zero) ever touches a subnormal result.
// One thread per packed byte. Entry points: mxfp4_decode_f32, mxfp4_decode_f64.
#include "common.cuh"

extern "C" __global__ void mxfp4_decode_f32(const unsigned char* blocks, const unsigned char* scales,
                                            unsigned int* out, long long n_groups) {
    long long n = n_groups * 16;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned int byte = blocks[i];
        unsigned int scale = scales[i / 16];
        out[2 * i] = mxfp4_f32_bits(byte & 0xfu, scale);
        out[2 * i + 1] = mxfp4_f32_bits(byte >> 4, scale);
    }
}

extern "C" __global__ void mxfp4_decode_f64(const unsigned char* blocks, const unsigned char* scales,
                                            unsigned long long* out, long long n_groups) {
    long long n = n_groups * 16;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned int byte = blocks[i];
        unsigned int scale = scales[i / 16];
        out[2 * i] = mxfp4_f64_bits(byte & 0xfu, scale);
        out[2 * i + 1] = mxfp4_f64_bits(byte >> 4, scale);
    }
}
