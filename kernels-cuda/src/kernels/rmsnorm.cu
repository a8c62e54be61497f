// RMSNorm of rows: out = weight * round_T(x * rsqrt(mean(x^2) + eps)), sums in f32.
//
// The rounding of the normalized value to the io type before the weight multiplies it follows
// transformers' DeepseekV3RMSNorm (`weight * hidden.to(input_dtype)`); for f32 it is exact.
// Rows may be strided so that a slice of a wider row (the c_kv part of kv_a_proj's output) is
// normalized in place. One block per row.

template <typename T>
__device__ void rmsnorm_impl(T* out, const T* x, const float* weight, int width, int in_stride,
                             int out_stride, float eps) {
    const long long row = blockIdx.x;
    const T* in_row = x + row * in_stride;
    T* out_row = out + row * out_stride;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float v = to_f32(in_row[i]);
        sq += v * v;
    }
    const float total = block_sum(sq);
    const float inv_rms = rsqrtf(total / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float normalized = round_to<T>(to_f32(in_row[i]) * inv_rms);
        out_row[i] = from_f32<T>(weight[i] * normalized);
    }
}

#define LS_DEFINE_RMSNORM(SUFFIX, T)                                                          \
    extern "C" __global__ void rmsnorm_##SUFFIX(T* out, const T* x, const float* weight,      \
                                                int width, int in_stride, int out_stride,     \
                                                float eps) {                                  \
        rmsnorm_impl<T>(out, x, weight, width, in_stride, out_stride, eps);                   \
    }

LS_FOR_EACH_DTYPE(LS_DEFINE_RMSNORM)
