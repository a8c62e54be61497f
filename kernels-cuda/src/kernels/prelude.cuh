// Shared by every latentserve kernel program; prepended to each .cu file before NVRTC sees it.
//
// NVRTC ships no CUDA headers, so 16-bit floats are plain 16-bit words here, converted with PTX
// instructions (f16) or bit arithmetic (bf16, round to nearest even). Arithmetic is f32.

typedef unsigned short ls_u16;

struct bf16_t {
    ls_u16 bits;
};
struct f16_t {
    ls_u16 bits;
};

__device__ __forceinline__ float to_f32(float x) { return x; }

__device__ __forceinline__ float to_f32(bf16_t x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}

__device__ __forceinline__ float to_f32(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float x);

template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    unsigned int u = __float_as_uint(x);
    bf16_t out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        // NaN: keep the sign, quiet NaN.
        out.bits = (ls_u16)((u >> 16) | 0x0040u);
        return out;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    out.bits = (ls_u16)(u >> 16);
    return out;
}

template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    f16_t out;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(x));
    return out;
}

// Rounds an f32 to T's precision and back: what storing in T and reloading would give.
template <typename T> __device__ __forceinline__ float round_to(float x) {
    return to_f32(from_f32<T>(x));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    float total = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(total);
}

// The cache slot of `position` of a sequence: its block (from the padded i32 block-table row)
// times the block size, plus the offset in the block.
__device__ __forceinline__ long long paged_slot(const int* block_table_row, int position,
                                                int block_size) {
    return (long long)block_table_row[position / block_size] * block_size + position % block_size;
}

// Emits `extern "C"` entry points named NAME_f32, NAME_f16, NAME_bf16 from a macro that takes
// (suffix, type): stable unmangled names, so no NVRTC name expressions are needed.
#define LS_FOR_EACH_DTYPE(DEFINE) \
    DEFINE(f32, float)            \
    DEFINE(f16, f16_t)            \
    DEFINE(bf16, bf16_t)
