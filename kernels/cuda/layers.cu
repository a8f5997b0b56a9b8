// The per-row layers around the products: embedding lookup, RMSNorm, RoPE, residual adds,
// the SwiGLU variants, row gathers, the non-finite check, and the final greedy pick.

#define EMBED(NAME, T, LOAD)                                                                                      \
    extern "C" __global__ void embed_##NAME(const T* table, const u32* ids, float* out, int H) {                  \
        const long row = (long)ids[blockIdx.x] * H;                                                               \
        for (int i = threadIdx.x; i < H; i += blockDim.x) out[(long)blockIdx.x * H + i] = LOAD(table[row + i]);   \
    }
__device__ __forceinline__ float same(float v) { return v; }
EMBED(bf16, u16, bf16_to_f32)
EMBED(f16, u16, f16_to_f32)
EMBED(f32, float, same)

// One block per row of D values: out = x / sqrt(mean(x²) + eps) * w. Rows of `x` are `D`
// apart; a q/k norm of one head's width normalises each head as its own row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int D, float eps) {
    const float* xr = x + (long)blockIdx.x * D;
    float* orow = out + (long)blockIdx.x * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
    const float inv = 1.0f / sqrtf(block_sum(ss) / D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}

// Rotate-half RoPE over `heads` heads of `hd` per token; cos/sin hold hd/2 values per token.
// grid: tokens.
extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, int heads, int hd) {
    const int half = hd / 2;
    const float* c = cos_t + (long)blockIdx.x * half;
    const float* s = sin_t + (long)blockIdx.x * half;
    float* row = x + (long)blockIdx.x * heads * hd;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int h = i / half, j = i % half;
        float* a = row + h * hd;
        const float x1 = a[j], x2 = a[j + half];
        a[j] = x1 * c[j] - x2 * s[j];
        a[j + half] = x2 * c[j] + x1 * s[j];
    }
}

#define GRID_STRIDE(i, n) for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (n); i += (long)gridDim.x * blockDim.x)

extern "C" __global__ void clip(float* x, long n, float c) {
    GRID_STRIDE(i, n) x[i] = fminf(fmaxf(x[i], -c), c);
}

// x += y
extern "C" __global__ void add(float* x, const float* y, long n) {
    GRID_STRIDE(i, n) x[i] += y[i];
}

// out = silu(gate) * up (Mixtral, Qwen, OLMoE).
extern "C" __global__ void swiglu(const float* gate, const float* up, float* out, long n) {
    GRID_STRIDE(i, n) out[i] = silu(gate[i]) * up[i];
}

// gpt-oss: interleaved [g0, u0, g1, u1, ...]; g = min(g, limit), u = clamp(u, ±limit),
// out = (u + 1) · g · σ(alpha · g).
extern "C" __global__ void clamped_swiglu(const float* gate_up, float* out, long n, float alpha, float limit) {
    GRID_STRIDE(i, n) {
        const float g = fminf(gate_up[2 * i], limit);
        const float u = fminf(fmaxf(gate_up[2 * i + 1], -limit), limit);
        out[i] = (u + 1.0f) * (g * sigmoid(g * alpha));
    }
}

// Qwen2-MoE's shared expert: y[r, :] *= σ(g[r]).
extern "C" __global__ void scale_rows_sigmoid(float* y, const float* g, int H, long rows) {
    GRID_STRIDE(i, rows * H) y[i] *= sigmoid(g[i / H]);
}

// out[r, :] = x[idx[r], :]; grid: output rows. The caller checks every index on the host.
extern "C" __global__ void gather_rows(const float* x, const u32* idx, float* out, int H) {
    const float* src = x + (long)idx[blockIdx.x] * H;
    float* dst = out + (long)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) dst[i] = src[i];
}

// flags[r] = 1 where row r of H values holds a NaN or an infinity (all exponent bits set),
// else 0; grid: rows. A bit test rather than isfinite, which fast-math may fold away.
extern "C" __global__ void non_finite_rows(const float* x, u32* flags, int H) {
    const float* row = x + (long)blockIdx.x * H;
    int bad = 0;
    for (int i = threadIdx.x; i < H; i += blockDim.x) bad |= (__float_as_uint(row[i]) & 0x7f800000u) == 0x7f800000u;
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) flags[blockIdx.x] = bad ? 1u : 0u;
}

// Per row of `V` logits: the greedy token (arg max, ties to the lower id) and its
// log-probability, -log Σ exp(x - max), summed in double as the CPU's log_softmax is. One
// block per row.
extern "C" __global__ void greedy_pick(const float* logits, int V, u32* ids, float* logprobs) {
    __shared__ float best_v[WARP];
    __shared__ int best_i[WARP];
    __shared__ double partial[WARP];
    const float* row = logits + (long)blockIdx.x * V;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        if (row[i] > bv) { bv = row[i]; bi = i; }
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    bv = lane < warps ? best_v[lane] : NEG_INF;
    bi = lane < warps ? best_i[lane] : 0x7fffffff;
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    // Every thread now holds the row's max in bv.
    double s = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += exp((double)row[i] - (double)bv);
    for (int o = WARP / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    s = lane < warps ? partial[lane] : 0.0;
    for (int o = WARP / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) {
        ids[blockIdx.x] = bi < V ? (u32)bi : 0u;  // no finite maximum in the row: id 0, as on the CPU
        logprobs[blockIdx.x] = (float)(-log(s));
    }
}

// Reads `n` float4s and writes one partial sum per block, so nothing is optimised away: the
// device's read bandwidth, the denominator of the benchmark's roofline.
extern "C" __global__ void read_sum(const float4* x, long n, float* partial) {
    float s = 0.0f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float4 v = x[i];
        s += v.x + v.y + v.z + v.w;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
