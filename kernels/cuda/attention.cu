// Attention over the paged KV cache.
//
// The cache is an arena of blocks; a block holds BLOCK_TOKENS positions of every layer's keys
// and values, laid out [layer][kv_head][k|v][position][head_dim] (f32), the CPU cache's
// layout. A sequence's block table lists its blocks in position order. Every new token
// carries its position and the offset of its sequence's table in the flattened tables.

#define BLOCK_TOKENS 16
#define ATTN_WARPS 4
#define MAX_HEAD_DIM 256
#define DIMS_PER_LANE (MAX_HEAD_DIM / WARP)

struct CacheShape {
    int layer, n_layers, n_kv_heads, head_dim;
    __device__ __forceinline__ long block_floats() const { return (long)n_layers * n_kv_heads * 2 * BLOCK_TOKENS * head_dim; }
    // Start of position `p`'s keys (kv = 0) or values (kv = 1) of head `g`.
    __device__ __forceinline__ long row(const int* table, int p, int g, int kv) const {
        const long block = table[p / BLOCK_TOKENS];
        return block * block_floats() + ((long)(layer * n_kv_heads + g) * 2 + kv) * BLOCK_TOKENS * head_dim +
               (long)(p % BLOCK_TOKENS) * head_dim;
    }
};

// Writes the new tokens' keys and values ([token, kv_head, head_dim]) of one layer into the
// cache. grid (tokens, kv_heads), block head_dim threads.
extern "C" __global__ void kv_write(const float* k, const float* v, float* cache, const int* pos, const int* table_at,
                                   const int* tables, CacheShape s) {
    const int t = blockIdx.x, g = blockIdx.y, d = threadIdx.x;
    const int* table = tables + table_at[t];
    const long src = ((long)t * s.n_kv_heads + g) * s.head_dim + d;
    cache[s.row(table, pos[t], g, 0) + d] = k[src];
    cache[s.row(table, pos[t], g, 1) + d] = v[src];
}

// Causal attention of each new token's query heads over its sequence's positions
// `lo ..= pos` (lo = pos + 1 - window with a sliding window, window >= 0; no window when
// negative), with grouped-query heads, and gpt-oss's per-head sink logit in the softmax
// denominator. A query that sees no position and has no sink gets zeros, as on the CPU.
// grid (tokens, heads), block ATTN_WARPS warps; each warp takes every ATTN_WARPS-th position
// with an online softmax, and the warps' partial results are merged at the end.
extern "C" __global__ void paged_attention(const float* q, float* out, const float* cache, const int* pos,
                                          const int* table_at, const int* tables, const float* sinks, CacheShape s,
                                          int n_heads, float scale, int window) {
    __shared__ float part_m[ATTN_WARPS], part_l[ATTN_WARPS];
    __shared__ float part_acc[ATTN_WARPS][MAX_HEAD_DIM];
    const int t = blockIdx.x, h = blockIdx.y;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int hd = s.head_dim;
    const int g = h / (n_heads / s.n_kv_heads);
    const int* table = tables + table_at[t];
    const int p_end = pos[t];
    const int lo = window >= 0 ? max(0, p_end + 1 - window) : 0;

    const float* qh = q + ((long)t * n_heads + h) * hd;
    float qv[DIMS_PER_LANE], acc[DIMS_PER_LANE];
#pragma unroll
    for (int i = 0; i < DIMS_PER_LANE; ++i) {
        const int d = lane + i * WARP;
        qv[i] = d < hd ? qh[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int p = lo + warp; p <= p_end; p += ATTN_WARPS) {
        const float* kr = cache + s.row(table, p, g, 0);
        const float* vr = cache + s.row(table, p, g, 1);
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < DIMS_PER_LANE; ++i) {
            const int d = lane + i * WARP;
            if (d < hd) dot += qv[i] * kr[d];
        }
        const float score = warp_sum(dot) * scale;
        const float m_new = fmaxf(m, score);
        const float corr = expf(m - m_new), e = expf(score - m_new);
        l = l * corr + e;
#pragma unroll
        for (int i = 0; i < DIMS_PER_LANE; ++i) {
            const int d = lane + i * WARP;
            if (d < hd) acc[i] = acc[i] * corr + e * vr[d];
        }
        m = m_new;
    }
    if (lane == 0) { part_m[warp] = m; part_l[warp] = l; }
#pragma unroll
    for (int i = 0; i < DIMS_PER_LANE; ++i) {
        const int d = lane + i * WARP;
        if (d < hd) part_acc[warp][d] = acc[i];
    }
    __syncthreads();
    float mm = sinks ? sinks[h] : NEG_INF;
    for (int w = 0; w < ATTN_WARPS; ++w) mm = fmaxf(mm, part_m[w]);
    float denom = sinks ? expf(sinks[h] - mm) : 0.0f;
    for (int w = 0; w < ATTN_WARPS; ++w)
        if (part_l[w] > 0.0f) denom += part_l[w] * expf(part_m[w] - mm);
    float* oh = out + ((long)t * n_heads + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w)
            if (part_l[w] > 0.0f) v += part_acc[w][d] * expf(part_m[w] - mm);
        oh[d] = denom > 0.0f ? v / denom : 0.0f;
    }
}
