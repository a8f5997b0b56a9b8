// The MoE gate and the token shuffles around the grouped expert products: top-k routing on
// the gate's logits, and the weighted combine of expert outputs back into token order.

#define MAX_EXPERTS 256
#define PER_LANE (MAX_EXPERTS / WARP)

// Warp arg max over the lanes' (value, index) pairs; ties go to the lower index.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
}

// One warp per token over `E` (<= 256) gate logits; writes the token's k (<= 32) experts,
// best first, and their weights.
//   mode 0: softmax over all experts, then top-k (weights renormalised over the k if
//           `renormalize`): Mixtral, Qwen, OLMoE.
//   mode 1: top-k of the logits, then softmax over the k: gpt-oss.
extern "C" __global__ void topk_gate(const float* logits, u32* ids, float* weights, int tokens, int E, int k,
                                     int mode, int renormalize) {
    const int lane = threadIdx.x % WARP;
    const int t = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (t >= tokens) return;
    const float* row = logits + (long)t * E;
    float v[PER_LANE];
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        const int e = j * WARP + lane;
        v[j] = e < E ? row[e] : NEG_INF;
    }
    if (mode == 0) {
        float m = NEG_INF;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) m = fmaxf(m, v[j]);
        m = warp_max(m);
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int e = j * WARP + lane;
            v[j] = e < E ? expf(v[j] - m) : 0.0f;
            s += v[j];
        }
        s = warp_sum(s);
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int e = j * WARP + lane;
            v[j] = e < E ? v[j] / s : NEG_INF;
        }
    }
    // k rounds of arg max; each winner is struck out.
    float picked_v = 0.0f;
    float first = 0.0f, sum = 0.0f;
    for (int r = 0; r < k; ++r) {
        float bv = NEG_INF;
        int bi = 0x7fffffff;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int e = j * WARP + lane;
            if (e < E && (v[j] > bv || (v[j] == bv && e < bi))) { bv = v[j]; bi = e; }
        }
        warp_argmax(bv, bi);
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j)
            if (j * WARP + lane == bi) v[j] = NEG_INF;
        if (r == 0) first = bv;
        if (lane == r) picked_v = bv;
        if (lane == 0) ids[(long)t * k + r] = (u32)bi;
        sum += mode == 0 ? bv : expf(bv - first);
    }
    if (lane < k) {
        float w;
        if (mode == 0) w = renormalize ? picked_v / sum : picked_v;
        else w = expf(picked_v - first) / sum;
        weights[(long)t * k + lane] = w;
    }
}

// out[t, :] = Σ_j w[j] · y[src[j], :] over the entries j = start[t] .. start[t + 1] of token
// t, in the order given (expert order), from 0. The product and the sum are rounded
// separately (no fused multiply-add), as the CPU backend computes them, so both backends
// give the same bits. The caller checks the lists on the host. grid: tokens.
extern "C" __global__ void combine_rows(const float* y, const u32* start, const u32* src, const float* w, float* out,
                                        int H) {
    const int t = blockIdx.x;
    const u32 a = start[t], b = start[t + 1];
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        float acc = 0.0f;
        for (u32 j = a; j < b; ++j) acc = __fadd_rn(acc, __fmul_rn(y[(long)src[j] * H + c], w[j]));
        out[(long)t * H + c] = acc;
    }
}
