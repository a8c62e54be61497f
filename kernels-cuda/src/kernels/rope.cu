// Rotary embedding with precomputed tables, in place.
//
// cos/sin: (table_rows, half) f32, already multiplied by YaRN's attention factor (as the CPU
// model's RopeTable is); row r of x uses table row positions[r]. For each of `heads` heads the
// rope slice x[r * row_stride + h * head_stride + offset ..][..2 * half] is rotated:
//   interleaved (DeepSeek's rope_interleave): pairs (x[2i], x[2i+1]) by angle i;
//   neox: pairs (x[i], x[i + half]) by angle i.
// Grid: (rows, heads); threads over i < half. Arithmetic in f32, one rounding per value.

template <typename T, bool INTERLEAVED>
__device__ void rope_impl(T* x, const float* cos_table, const float* sin_table,
                          const int* positions, int half, int row_stride, int head_stride,
                          int offset) {
    const long long row = blockIdx.x;
    const int head = blockIdx.y;
    T* slice = x + row * row_stride + (long long)head * head_stride + offset;
    const long long table_row = (long long)positions[row] * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float c = cos_table[table_row + i];
        const float s = sin_table[table_row + i];
        const int ia = INTERLEAVED ? 2 * i : i;
        const int ib = INTERLEAVED ? 2 * i + 1 : i + half;
        const float a = to_f32(slice[ia]);
        const float b = to_f32(slice[ib]);
        slice[ia] = from_f32<T>(a * c - b * s);
        slice[ib] = from_f32<T>(b * c + a * s);
    }
}

#define LS_DEFINE_ROPE(SUFFIX, T)                                                             \
    extern "C" __global__ void rope_interleaved_##SUFFIX(                                     \
        T* x, const float* cos_table, const float* sin_table, const int* positions, int half, \
        int row_stride, int head_stride, int offset) {                                        \
        rope_impl<T, true>(x, cos_table, sin_table, positions, half, row_stride, head_stride, \
                           offset);                                                           \
    }                                                                                         \
    extern "C" __global__ void rope_neox_##SUFFIX(                                            \
        T* x, const float* cos_table, const float* sin_table, const int* positions, int half, \
        int row_stride, int head_stride, int offset) {                                        \
        rope_impl<T, false>(x, cos_table, sin_table, positions, half, row_stride,             \
                            head_stride, offset);                                             \
    }

LS_FOR_EACH_DTYPE(LS_DEFINE_ROPE)
