// The SwiGLU activation of the MLPs and experts: out = silu(gate) * up, in f32, rounded once.
// gate and up are (rows, width) with their own row strides (so one fused gate_up projection
// output [gate | up] can be passed as two views). Grid: (ceil(width / blockDim), rows).

template <typename T>
__device__ void silu_mul_impl(T* out, const T* gate, const T* up, int width, int gate_stride,
                              int up_stride, int out_stride) {
    const long long row = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= width) {
        return;
    }
    const float g = to_f32(gate[row * gate_stride + i]);
    const float u = to_f32(up[row * up_stride + i]);
    out[row * out_stride + i] = from_f32<T>(g / (1.0f + expf(-g)) * u);
}

#define LS_DEFINE_SILU_MUL(SUFFIX, T)                                                         \
    extern "C" __global__ void silu_mul_##SUFFIX(T* out, const T* gate, const T* up,          \
                                                 int width, int gate_stride, int up_stride,   \
                                                 int out_stride) {                            \
        silu_mul_impl<T>(out, gate, up, width, gate_stride, up_stride, out_stride);           \
    }

LS_FOR_EACH_DTYPE(LS_DEFINE_SILU_MUL)
