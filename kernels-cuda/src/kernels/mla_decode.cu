// Absorbed MLA decode attention over the paged latent cache, split along the sequence.
//
// Per decode token b and head h the absorbed query q[b, h] (lat = kv_lora_rank + rope values:
// q_nope[h] @ W_UK[h] in latent space, then the rotated q_pe) is scored against every cached row
// of its sequence (the row is normalized c_kv ++ rotated k_pe, so one dot product gives
// q_nope.k_nope + q_pe.k_pe), softmax(scale * scores) weights the c_kv part of the rows, and the
// result (heads, kv_lora_rank) is what W_UV then projects to v_head_dim. This is the math of the
// CPU model's decode_absorbed (worker/src/model/mla.rs).
//
// Long sequences are split into `num_splits` ranges of `split_len` positions, each block doing
// one (token, split, group of MLA_HEADS_PER_BLOCK heads) with an online softmax, so short
// batches still fill the GPU (as FlashMLA does). Each split leaves its running max m, its sum of
// exp l and its unnormalized weighted sum o; mla_decode_combine merges the splits:
//   M = max_s m_s,  out = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s.
// Every head of a group reads the same latent row, so a row is loaded once per group.
//
// Shapes (row-major):
//   q        (batch, heads, lat) f32
//   cache    (num_blocks * block_size, lat) T, one layer
//   block_tables (batch, max_blocks) i32, padded rows; seq_lens (batch) i32, positions to
//            attend (the new token's row already written)
//   o_part   (batch, num_splits, heads, kv_lora) f32; m_part, l_part (batch, num_splits, heads)
// Launch: grid (batch, num_splits, ceil(heads / MLA_HEADS_PER_BLOCK)), blockDim.x a multiple of
// 32 up to 1024 with kv_lora <= blockDim.x * MLA_MAX_COLS_PER_THREAD, dynamic shared memory
// MLA_HEADS_PER_BLOCK * lat * 4 bytes.

#ifndef MLA_HEADS_PER_BLOCK
#define MLA_HEADS_PER_BLOCK 8
#endif
#ifndef MLA_MAX_COLS_PER_THREAD
#define MLA_MAX_COLS_PER_THREAD 4
#endif

#define LS_NEG_INF (-__int_as_float(0x7f800000))

template <typename T>
__device__ void mla_decode_split_impl(float* o_part, float* m_part, float* l_part,
                                      const float* q, const T* cache, const int* block_tables,
                                      const int* seq_lens, float scale, int heads, int kv_lora,
                                      int rope, int max_blocks, int block_size, int split_len) {
    constexpr int HG = MLA_HEADS_PER_BLOCK;
    constexpr int COLS = MLA_MAX_COLS_PER_THREAD;
    extern __shared__ float q_shared[];  // (HG, lat)
    __shared__ float score_shared[32][HG];
    __shared__ float weight_shared[32][HG];

    const int b = blockIdx.x;
    const int split = blockIdx.y;
    const int num_splits = gridDim.y;
    const int first_head = blockIdx.z * HG;
    const int lat = kv_lora + rope;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int seq_len = seq_lens[b];
    const int start = split * split_len;
    const int end = min(start + split_len, seq_len);
    const int* table = block_tables + (long long)b * max_blocks;

    for (int i = threadIdx.x; i < HG * lat; i += blockDim.x) {
        const int h = first_head + i / lat;
        q_shared[i] = h < heads ? q[((long long)b * heads + h) * lat + i % lat] : 0.0f;
    }

    float m[HG];
    float l[HG];
    float acc[HG][COLS];
#pragma unroll
    for (int h = 0; h < HG; ++h) {
        m[h] = LS_NEG_INF;
        l[h] = 0.0f;
#pragma unroll
        for (int j = 0; j < COLS; ++j) {
            acc[h][j] = 0.0f;
        }
    }
    __syncthreads();

    for (int base = start; base < end; base += warps) {
        // 1. One position per warp: its scores against every head of the group.
        const int pos = base + warp;
        if (pos < end) {
            const T* row = cache + paged_slot(table, pos, block_size) * lat;
            float dots[HG];
#pragma unroll
            for (int h = 0; h < HG; ++h) {
                dots[h] = 0.0f;
            }
            for (int k = lane; k < lat; k += 32) {
                const float v = to_f32(row[k]);
#pragma unroll
                for (int h = 0; h < HG; ++h) {
                    dots[h] += q_shared[h * lat + k] * v;
                }
            }
#pragma unroll
            for (int h = 0; h < HG; ++h) {
                const float d = warp_sum(dots[h]);
                if (lane == 0) {
                    score_shared[warp][h] = first_head + h < heads ? d * scale : LS_NEG_INF;
                }
            }
        } else if (lane == 0) {
#pragma unroll
            for (int h = 0; h < HG; ++h) {
                score_shared[warp][h] = LS_NEG_INF;
            }
        }
        __syncthreads();

        // 2. New running max per head (every thread computes the same values), and the tile's
        //    softmax weights relative to it, one (position, head) per thread.
        float new_m[HG];
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            float tile_max = LS_NEG_INF;
            for (int w = 0; w < warps; ++w) {
                tile_max = fmaxf(tile_max, score_shared[w][h]);
            }
            new_m[h] = fmaxf(m[h], tile_max);
        }
        for (int i = threadIdx.x; i < warps * HG; i += blockDim.x) {
            const int w = i / HG;
            const int h = i % HG;
            const float s = score_shared[w][h];
            float mh = LS_NEG_INF;
#pragma unroll
            for (int g = 0; g < HG; ++g) {
                mh = g == h ? new_m[g] : mh;
            }
            weight_shared[w][h] = s == LS_NEG_INF ? 0.0f : expf(s - mh);
        }
        __syncthreads();

        // 3. Rescale what was accumulated, then add the tile's weighted c_kv columns.
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            const float correction = m[h] == LS_NEG_INF ? 0.0f : expf(m[h] - new_m[h]);
            float tile_sum = 0.0f;
            for (int w = 0; w < warps; ++w) {
                tile_sum += weight_shared[w][h];
            }
            l[h] = l[h] * correction + tile_sum;
            m[h] = new_m[h];
#pragma unroll
            for (int j = 0; j < COLS; ++j) {
                acc[h][j] *= correction;
            }
        }
        for (int w = 0; w < warps && base + w < end; ++w) {
            const T* row = cache + paged_slot(table, base + w, block_size) * lat;
#pragma unroll
            for (int j = 0; j < COLS; ++j) {
                const int c = threadIdx.x + j * blockDim.x;
                if (c < kv_lora) {
                    const float v = to_f32(row[c]);
#pragma unroll
                    for (int h = 0; h < HG; ++h) {
                        acc[h][j] += weight_shared[w][h] * v;
                    }
                }
            }
        }
        __syncthreads();
    }

    const long long part = (long long)b * num_splits + split;
#pragma unroll
    for (int h = 0; h < HG; ++h) {
        const int head = first_head + h;
        if (head >= heads) {
            continue;
        }
        float* o = o_part + (part * heads + head) * kv_lora;
#pragma unroll
        for (int j = 0; j < COLS; ++j) {
            const int c = threadIdx.x + j * blockDim.x;
            if (c < kv_lora) {
                o[c] = acc[h][j];
            }
        }
        if (threadIdx.x == 0) {
            m_part[part * heads + head] = m[h];
            l_part[part * heads + head] = l[h];
        }
    }
}

// Merges the splits of one (token, head): grid (batch, heads), threads over kv_lora. Writes the
// attention output (batch, heads, kv_lora) in T and, when `lse` is not null, the log-sum-exp of
// the scaled scores (batch, heads) for merging with other attention pieces.
template <typename T>
__device__ void mla_decode_combine_impl(T* out, float* lse, const float* o_part,
                                        const float* m_part, const float* l_part,
                                        int num_splits, int heads, int kv_lora) {
    const int b = blockIdx.x;
    const int h = blockIdx.y;
    float global_max = LS_NEG_INF;
    for (int s = 0; s < num_splits; ++s) {
        global_max = fmaxf(global_max, m_part[((long long)b * num_splits + s) * heads + h]);
    }
    float denominator = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
        const long long i = ((long long)b * num_splits + s) * heads + h;
        if (m_part[i] != LS_NEG_INF) {
            denominator += l_part[i] * expf(m_part[i] - global_max);
        }
    }
    const float inv = denominator > 0.0f ? 1.0f / denominator : 0.0f;
    for (int c = threadIdx.x; c < kv_lora; c += blockDim.x) {
        float sum = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            const long long i = ((long long)b * num_splits + s) * heads + h;
            if (m_part[i] != LS_NEG_INF) {
                sum += o_part[i * kv_lora + c] * expf(m_part[i] - global_max);
            }
        }
        out[((long long)b * heads + h) * kv_lora + c] = from_f32<T>(sum * inv);
    }
    if (lse != nullptr && threadIdx.x == 0) {
        lse[(long long)b * heads + h] =
            denominator > 0.0f ? global_max + logf(denominator) : LS_NEG_INF;
    }
}

#define LS_DEFINE_MLA_DECODE(SUFFIX, T)                                                       \
    extern "C" __global__ void mla_decode_split_##SUFFIX(                                     \
        float* o_part, float* m_part, float* l_part, const float* q, const T* cache,          \
        const int* block_tables, const int* seq_lens, float scale, int heads, int kv_lora,    \
        int rope, int max_blocks, int block_size, int split_len) {                            \
        mla_decode_split_impl<T>(o_part, m_part, l_part, q, cache, block_tables, seq_lens,    \
                                 scale, heads, kv_lora, rope, max_blocks, block_size,         \
                                 split_len);                                                  \
    }                                                                                         \
    extern "C" __global__ void mla_decode_combine_##SUFFIX(                                   \
        T* out, float* lse, const float* o_part, const float* m_part, const float* l_part,    \
        int num_splits, int heads, int kv_lora) {                                             \
        mla_decode_combine_impl<T>(out, lse, o_part, m_part, l_part, num_splits, heads,       \
                                   kv_lora);                                                  \
    }

LS_FOR_EACH_DTYPE(LS_DEFINE_MLA_DECODE)
