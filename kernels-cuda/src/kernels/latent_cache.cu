// Writes new tokens' latent rows (normalized c_kv ++ rotated k_pe, `width` = kv_lora_rank +
// qk_rope_head_dim values) into one layer of the paged latent cache.
//
// cache: (num_blocks * block_size, width); row r of `latents` (stride latent_stride) belongs to
// sequence row_seq[r] at position row_pos[r]; its slot comes from that sequence's row of the
// padded i32 block tables (max_blocks per row). Grid: rows; threads over the width.

template <typename T>
__device__ void latent_cache_write_impl(T* cache, const T* latents, const int* block_tables,
                                        const int* row_seq, const int* row_pos, int width,
                                        int latent_stride, int max_blocks, int block_size) {
    const long long row = blockIdx.x;
    const int* table = block_tables + (long long)row_seq[row] * max_blocks;
    const long long slot = paged_slot(table, row_pos[row], block_size);
    const T* src = latents + row * latent_stride;
    T* dst = cache + slot * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        dst[i] = src[i];
    }
}

#define LS_DEFINE_LATENT_CACHE_WRITE(SUFFIX, T)                                               \
    extern "C" __global__ void latent_cache_write_##SUFFIX(                                   \
        T* cache, const T* latents, const int* block_tables, const int* row_seq,              \
        const int* row_pos, int width, int latent_stride, int max_blocks, int block_size) {   \
        latent_cache_write_impl<T>(cache, latents, block_tables, row_seq, row_pos, width,     \
                                   latent_stride, max_blocks, block_size);                    \
    }

LS_FOR_EACH_DTYPE(LS_DEFINE_LATENT_CACHE_WRITE)
