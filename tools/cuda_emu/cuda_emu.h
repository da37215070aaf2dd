// cuda_emu.h: just enough of the CUDA kernel language to run gptevo's .cu kernels on a CPU.
//
// Compiled by g++ (-std=c++20 -pthread) with ``-include cuda_emu.h`` in front of a kernel module;
// tools/cuda_emu/loader.py generates one launcher per ``extern "C" __global__`` entry point and
// loads the result with ctypes behind the interface of ``cupy.RawModule(code).get_function(name)``.
// Built on the C pthread API (not <thread>/<mutex>/<functional>) so that it parses in ~0.1 s.
//
// Model: the blocks of a grid run one after another; each CUDA thread of a block is an OS thread.
// - __global__/__device__ vanish; __shared__ is ``static`` (valid because blocks never overlap);
//   ``extern __shared__ T buf[];`` is rewritten by the loader to a pointer into a per-launch
//   buffer that starts filled with 0xFF bytes (NaN), so reading it before writing shows up.
// - threadIdx/blockIdx/blockDim/gridDim are thread-locals.
// - __syncthreads() is a generation barrier among the threads still running the block: all
//   threads must wait at the same call site (else "divergent barrier"), threads that returned
//   are dropped, and a wait longer than GPTEVO_EMU_TIMEOUT seconds (default 20) is a deadlock error.
// - warp shuffles are a rendezvous of the lanes named in the mask: each lane must be in the mask,
//   all callers must pass the same mask at the same line, a lane in the mask that has returned
//   (or does not exist) is an error, and every lane's result uses the hardware's source-lane formula.
// - atomics are GCC __atomic builtins; flush-to-zero and denormals-are-zero are set in every
//   worker (CuPy compiles with -ftz=true). Errors abort the launch and come back as a message.
// Not modelled: tensor cores, inline PTX, the GPU's memory model, races between blocks, speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <pthread.h>
#include <type_traits>
#include <xmmintrin.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned int x, y, z; };

namespace emu {

inline thread_local uint3 tl_thread_idx, tl_block_idx;
inline thread_local dim3 tl_block_dim, tl_grid_dim;
inline thread_local int tl_tid = 0;          // linear thread index within the block

struct Abort {};                              // unwinds a worker after an error

struct Warp {
    unsigned int arrived = 0, exited = 0, mask = 0;
    int line = 0;
    unsigned long gen = 0;
    uint64_t vals[32];
    int srcs[32];
    uint64_t results[2][32];
    pthread_cond_t cv;                        // lanes of this warp wait here
};

struct Launch {
    pthread_mutex_t mu;
    pthread_cond_t cv;                        // __syncthreads and end of block
    int nthreads = 0;
    dim3 grid, block;
    double timeout_s = 20.0;
    int live = 0, waiting = 0;                // __syncthreads state (reset between blocks)
    unsigned long generation = 0;
    int site_line = 0;
    const char* site_file = "";
    int finished = 0;                         // end-of-block barrier
    unsigned long block_generation = 0;
    Warp* warps = nullptr;
    int nwarps = 0;
    unsigned char* dynamic_shared = nullptr;
    void (*body)(void**) = nullptr;
    void** args = nullptr;
    bool aborted = false;
    char error[512] = {0};
};

inline Launch* g_launch = nullptr;

struct Lock {                                 // scoped pthread mutex
    pthread_mutex_t* m;
    explicit Lock(pthread_mutex_t* m_) : m(m_) { pthread_mutex_lock(m); }
    ~Lock() { pthread_mutex_unlock(m); }
};

inline void notify_everyone(Launch& L) {
    pthread_cond_broadcast(&L.cv);
    for (int w = 0; w < L.nwarps; ++w) pthread_cond_broadcast(&L.warps[w].cv);
}

inline void where(char* buf, size_t n) {
    std::snprintf(buf, n, "block (%u,%u,%u) thread (%u,%u,%u)", tl_block_idx.x, tl_block_idx.y, tl_block_idx.z,
                  tl_thread_idx.x, tl_thread_idx.y, tl_thread_idx.z);
}

// Record the first error, wake everybody and unwind this worker (the mutex is held by the caller).
[[noreturn]] inline void fail_locked(Launch& L, const char* msg) {
    if (!L.aborted) { L.aborted = true; std::snprintf(L.error, sizeof L.error, "%s", msg); }
    notify_everyone(L);
    throw Abort{};
}

template <typename Pred>
inline void wait_until(Launch& L, pthread_cond_t* cv, Pred done, const char* what, int line) {
    timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    double whole = std::floor(L.timeout_s);
    deadline.tv_sec += (time_t)whole;
    deadline.tv_nsec += (long)((L.timeout_s - whole) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec += 1; deadline.tv_nsec -= 1000000000L; }
    while (!done()) {
        if (L.aborted) throw Abort{};
        if (pthread_cond_timedwait(cv, &L.mu, &deadline) != 0 && !done()) {
            if (L.aborted) throw Abort{};
            char at[96], buf[256];
            where(at, sizeof at);
            std::snprintf(buf, sizeof buf, "deadlock: %s at line %d waited %.1f s (%s)", what, line, L.timeout_s, at);
            fail_locked(L, buf);
        }
    }
}

inline void syncthreads(const char* file, int line) {
    Launch& L = *g_launch;
    Lock lock(&L.mu);
    if (L.aborted) throw Abort{};
    if (L.waiting == 0) { L.site_line = line; L.site_file = file; }
    else if (L.site_line != line || std::strcmp(L.site_file, file) != 0) {
        char at[96], buf[256];
        where(at, sizeof at);
        std::snprintf(buf, sizeof buf, "divergent __syncthreads: %s waits at line %d, others at line %d", at, line,
                      L.site_line);
        fail_locked(L, buf);
    }
    unsigned long gen = L.generation;
    if (++L.waiting == L.live) { L.waiting = 0; ++L.generation; pthread_cond_broadcast(&L.cv); return; }
    wait_until(L, &L.cv, [&] { return L.generation != gen; }, "__syncthreads", line);
}

// One warp collective: the lane deposits ``value`` and names the lane it reads (``src``, -1 = own).
inline uint64_t warp_exchange(unsigned int mask, uint64_t value, int src, int line) {
    Launch& L = *g_launch;
    int lane = tl_tid % 32;
    Warp& W = L.warps[tl_tid / 32];
    Lock lock(&L.mu);
    if (L.aborted) throw Abort{};
    char at[96], buf[256];
    where(at, sizeof at);
    if (!(mask >> lane & 1u)) {
        std::snprintf(buf, sizeof buf, "warp collective at line %d: lane %d calls it with mask 0x%08x that does "
                      "not name it (%s)", line, lane, mask, at);
        fail_locked(L, buf);
    }
    if (W.arrived == 0) { W.mask = mask; W.line = line; }
    else if (W.mask != mask || W.line != line) {
        std::snprintf(buf, sizeof buf, "warp collective: lane %d at line %d with mask 0x%08x, other lanes at line "
                      "%d with mask 0x%08x (%s)", lane, line, mask, W.line, W.mask, at);
        fail_locked(L, buf);
    }
    if (src >= 0 && !(mask >> src & 1u)) {
        std::snprintf(buf, sizeof buf, "warp shuffle at line %d: lane %d reads lane %d, which is not in mask "
                      "0x%08x (%s)", line, lane, src, mask, at);
        fail_locked(L, buf);
    }
    W.vals[lane] = value;
    W.srcs[lane] = src < 0 ? lane : src;
    W.arrived |= 1u << lane;
    unsigned long gen = W.gen;
    auto check_exited = [&] {
        if (W.exited & mask) {
            std::snprintf(buf, sizeof buf, "warp collective at line %d: mask 0x%08x names lanes that have returned "
                          "or do not exist (0x%08x)", line, mask, W.exited & mask);
            fail_locked(L, buf);
        }
    };
    check_exited();
    if (W.arrived == mask) {
        for (int i = 0; i < 32; ++i)
            if (mask >> i & 1u) W.results[gen % 2][i] = W.vals[W.srcs[i]];
        W.arrived = 0;
        ++W.gen;
        pthread_cond_broadcast(&W.cv);
    } else {
        wait_until(L, &W.cv, [&] { if (W.gen != gen) return true; check_exited(); return false; },
                   "warp collective", line);
    }
    return W.results[gen % 2][lane];
}

template <typename T> inline uint64_t to_bits(T v) { uint64_t b = 0; std::memcpy(&b, &v, sizeof(T)); return b; }
template <typename T> inline T from_bits(uint64_t b) { T v; std::memcpy(&v, &b, sizeof(T)); return v; }
inline int lane_id() { return tl_tid % 32; }

template <typename T> inline T shfl(int line, unsigned mask, T v, int src_lane, int width = 32) {
    int base = lane_id() & ~(width - 1);
    return from_bits<T>(warp_exchange(mask, to_bits(v), base + (src_lane % width), line));
}
template <typename T> inline T shfl_xor(int line, unsigned mask, T v, int lane_mask, int width = 32) {
    int lane = lane_id(), src = lane ^ lane_mask;
    if (src >= (lane & ~(width - 1)) + width) src = -1;          // outside the segment: own value
    return from_bits<T>(warp_exchange(mask, to_bits(v), src, line));
}
template <typename T> inline T shfl_down(int line, unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = lane_id(), src = lane + (int)delta;
    if (src >= (lane & ~(width - 1)) + width) src = -1;
    return from_bits<T>(warp_exchange(mask, to_bits(v), src, line));
}
template <typename T> inline T shfl_up(int line, unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = lane_id(), src = lane - (int)delta;
    if (src < (lane & ~(width - 1))) src = -1;
    return from_bits<T>(warp_exchange(mask, to_bits(v), src, line));
}
inline void syncwarp(int line, unsigned mask = 0xffffffffu) { (void)warp_exchange(mask, 0, -1, line); }

inline void* dynamic_shared() { return g_launch->dynamic_shared; }

// Lanes past the end of a partial last warp never run: they count as returned.
inline void reset_warps(Launch& L) {
    for (int w = 0; w < L.nwarps; ++w) {
        int present = L.nthreads - w * 32 < 32 ? L.nthreads - w * 32 : 32;
        L.warps[w].arrived = 0;
        L.warps[w].exited = present == 32 ? 0u : ~((1u << present) - 1u);
    }
}

// This thread returned from the kernel for the current block: drop it from barriers.
inline void thread_done() {
    Launch& L = *g_launch;
    Lock lock(&L.mu);
    --L.live;
    L.warps[tl_tid / 32].exited |= 1u << (tl_tid % 32);
    if (L.waiting > 0 && L.waiting == L.live) { L.waiting = 0; ++L.generation; }
    pthread_cond_broadcast(&L.cv);
    pthread_cond_broadcast(&L.warps[tl_tid / 32].cv);
}

// Wait until every thread finished the block; the last one resets the per-block state.
// Returns false when the launch was aborted.
inline bool end_of_block() {
    Launch& L = *g_launch;
    Lock lock(&L.mu);
    unsigned long gen = L.block_generation;
    if (++L.finished == L.nthreads) {
        L.finished = 0;
        L.live = L.nthreads;
        L.waiting = 0;
        reset_warps(L);
        ++L.block_generation;
        pthread_cond_broadcast(&L.cv);
    } else {
        while (L.block_generation == gen && !L.aborted) pthread_cond_wait(&L.cv, &L.mu);
    }
    return !L.aborted;
}

inline void* worker(void* arg) {
    Launch& L = *g_launch;
    int tid = (int)(intptr_t)arg;
    _mm_setcsr(_mm_getcsr() | 0x8040);          // FTZ + DAZ, as -ftz=true on the GPU
    tl_tid = tid;
    tl_thread_idx = {tid % L.block.x, (tid / L.block.x) % L.block.y, tid / (L.block.x * L.block.y)};
    tl_block_dim = L.block;
    tl_grid_dim = L.grid;
    for (unsigned int bz = 0; bz < L.grid.z; ++bz)
        for (unsigned int by = 0; by < L.grid.y; ++by)
            for (unsigned int bx = 0; bx < L.grid.x; ++bx) {
                tl_block_idx = {bx, by, bz};
                bool ok = true;
                try {
                    L.body(L.args);
                } catch (const Abort&) {
                    ok = false;
                } catch (...) {
                    Lock lock(&L.mu);
                    if (!L.aborted) { L.aborted = true; std::snprintf(L.error, sizeof L.error, "C++ exception"); }
                    notify_everyone(L);
                    ok = false;
                }
                if (ok) thread_done();
                if (!end_of_block()) return nullptr;
            }
    return nullptr;
}

// Run ``body(args)`` as a grid of blocks; 0 on success, else 1 with the message in ``err``.
inline int launch(dim3 grid, dim3 block, unsigned long long shared_bytes, char* err, int errlen,
                  void (*body)(void**), void** args) {
    int nthreads = (int)(block.x * block.y * block.z);
    if (nthreads < 1 || nthreads > 1024 || (unsigned long long)grid.x * grid.y * grid.z == 0) {
        std::snprintf(err, errlen, "bad launch: block (%u,%u,%u) grid (%u,%u,%u)", block.x, block.y, block.z,
                      grid.x, grid.y, grid.z);
        return 1;
    }
    Launch L;
    pthread_mutex_init(&L.mu, nullptr);
    pthread_cond_init(&L.cv, nullptr);
    L.nthreads = L.live = nthreads;
    L.grid = grid;
    L.block = block;
    L.body = body;
    L.args = args;
    if (const char* t = std::getenv("GPTEVO_EMU_TIMEOUT")) L.timeout_s = std::atof(t);
    L.nwarps = (nthreads + 31) / 32;
    L.warps = new Warp[L.nwarps];
    for (int w = 0; w < L.nwarps; ++w) pthread_cond_init(&L.warps[w].cv, nullptr);
    reset_warps(L);
    L.dynamic_shared = (unsigned char*)std::malloc(shared_bytes + 16);
    std::memset(L.dynamic_shared, 0xFF, shared_bytes + 16);
    g_launch = &L;
    pthread_t* threads = new pthread_t[nthreads];
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    int started = 0;
    for (; started < nthreads; ++started)
        if (pthread_create(&threads[started], &attr, worker, (void*)(intptr_t)started) != 0) break;
    if (started < nthreads) {                   // could not start every thread: abort the others
        Lock lock(&L.mu);
        L.aborted = true;
        std::snprintf(L.error, sizeof L.error, "could not start %d threads (started %d)", nthreads, started);
        notify_everyone(L);
    }
    for (int i = 0; i < started; ++i) pthread_join(threads[i], nullptr);
    pthread_attr_destroy(&attr);
    delete[] threads;
    g_launch = nullptr;
    int rc = 0;
    if (L.aborted) { std::snprintf(err, errlen, "%s", L.error); rc = 1; }
    for (int w = 0; w < L.nwarps; ++w) pthread_cond_destroy(&L.warps[w].cv);
    delete[] L.warps;
    std::free(L.dynamic_shared);
    pthread_cond_destroy(&L.cv);
    pthread_mutex_destroy(&L.mu);
    return rc;
}

}  // namespace emu

#define threadIdx (emu::tl_thread_idx)
#define blockIdx (emu::tl_block_idx)
#define blockDim (emu::tl_block_dim)
#define gridDim (emu::tl_grid_dim)
#define warpSize 32

#define __syncthreads() emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) emu::syncwarp(__LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_sync(...) emu::shfl(__LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) emu::shfl_xor(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) emu::shfl_down(__LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) emu::shfl_up(__LINE__, __VA_ARGS__)

// ---- bit casts and math intrinsics --------------------------------------------------------------
inline float __uint_as_float(unsigned int b) { float f; std::memcpy(&f, &b, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int b; std::memcpy(&b, &f, 4); return b; }
inline float __int_as_float(int b) { float f; std::memcpy(&f, &b, 4); return f; }
inline int __float_as_int(float f) { int b; std::memcpy(&b, &f, 4); return b; }
inline double __longlong_as_double(long long b) { double d; std::memcpy(&d, &b, 8); return d; }
inline long long __double_as_longlong(double d) { long long b; std::memcpy(&b, &d, 8); return b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

// ---- atomics (GCC builtins; floating-point add by compare-and-swap) -----------------------------
template <typename T> inline T atomicAdd(T* p, T v) {
    if constexpr (std::is_integral_v<T>) {
        return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    } else {
        T old, want;
        __atomic_load(p, &old, __ATOMIC_SEQ_CST);
        do { want = old + v; } while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_SEQ_CST,
                                                                __ATOMIC_SEQ_CST));
        return old;
    }
}
template <typename T> inline T atomicMax(T* p, T v) {
    T old;
    __atomic_load(p, &old, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange(p, &old, &v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
