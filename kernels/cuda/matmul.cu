// Linear layers `out[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n])` with weights in their stored
// dtype, and the grouped form MoE layers use: every local expert of a layer in one launch,
// each over the (variable) rows routed to it.
//
// One warp computes one output column for a tile of up to TILE_ROWS rows: it streams the
// weight row once in 16-byte packs and multiplies each pack with every row of the tile, so a
// decode step reads each weight once. Rows beyond a tile (prefill) re-read the weight row,
// which is why large products go to cuBLAS instead (see `cuda::matmul`).

#define TILE_ROWS 8
#define COLS_PER_BLOCK 8  // one per warp

// 16-bit weights (bf16 or f16, by their widening `C::f32`): eight to a pack.
template <class C>
struct PHalf {
    typedef u16 T;
    enum { PACK = 8 };
    static __device__ __forceinline__ void unpack(uint4 r, float* o) {
        u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            o[2 * i] = C::f32((u16)(w[i] & 0xffffu));
            o[2 * i + 1] = C::f32((u16)(w[i] >> 16));
        }
    }
    static __device__ __forceinline__ float ld(const u16* p, long i) { return C::f32(p[i]); }
};
struct Bf16 { static __device__ __forceinline__ float f32(u16 b) { return bf16_to_f32(b); } };
struct F16 { static __device__ __forceinline__ float f32(u16 h) { return f16_to_f32(h); } };
typedef PHalf<Bf16> PBf16;
typedef PHalf<F16> PF16;

struct PF32 {
    typedef float T;
    enum { PACK = 4 };
    static __device__ __forceinline__ void unpack(uint4 r, float* o) {
        o[0] = __uint_as_float(r.x);
        o[1] = __uint_as_float(r.y);
        o[2] = __uint_as_float(r.z);
        o[3] = __uint_as_float(r.w);
    }
    static __device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
};

// Column `n` of rows `row0 .. row0 + rows` (rows <= TILE_ROWS), by the calling warp.
// `vec`: K is a multiple of the pack and the rows are 16-byte aligned, so packs may be used.
template <class P>
__device__ __forceinline__ void column_tile(const float* __restrict__ x, const typename P::T* __restrict__ w,
                                            const float* __restrict__ bias, float* __restrict__ out, int row0,
                                            int rows, int n, int N, int K, bool vec) {
    const int lane = threadIdx.x % WARP;
    const typename P::T* wrow = w + (long)n * K;
    float acc[TILE_ROWS];
#pragma unroll
    for (int r = 0; r < TILE_ROWS; ++r) acc[r] = 0.0f;

    int k0 = 0;
    if (vec) {
        const int packs = K / P::PACK;
        const uint4* wp = (const uint4*)wrow;
        for (int p = lane; p < packs; p += WARP) {
            float wv[P::PACK];
            P::unpack(__ldg(wp + p), wv);
#pragma unroll
            for (int r = 0; r < TILE_ROWS; ++r) {
                if (r < rows) {
                    const float* xr = x + (long)(row0 + r) * K + p * P::PACK;
                    float s = 0.0f;
#pragma unroll
                    for (int j = 0; j < P::PACK; j += 4) {
                        float4 xv = *(const float4*)(xr + j);
                        s += wv[j] * xv.x + wv[j + 1] * xv.y + wv[j + 2] * xv.z + wv[j + 3] * xv.w;
                    }
                    acc[r] += s;
                }
            }
        }
        k0 = packs * P::PACK;
    }
    for (int k = k0 + lane; k < K; k += WARP) {
        float wv = P::ld(wrow, k);
#pragma unroll
        for (int r = 0; r < TILE_ROWS; ++r)
            if (r < rows) acc[r] += wv * x[(long)(row0 + r) * K + k];
    }
    const float b = bias ? bias[n] : 0.0f;
#pragma unroll
    for (int r = 0; r < TILE_ROWS; ++r) {
        float v = warp_sum(acc[r]);
        if (lane == 0 && r < rows) out[(long)(row0 + r) * N + n] = v + b;
    }
}

// grid (ceil(M / TILE_ROWS), ceil(N / COLS_PER_BLOCK)), block COLS_PER_BLOCK warps. Row
// tiles go on x, whose limit is 2^31 - 1 (y stops at 65535).
template <class P>
__device__ void linear(const float* x, const typename P::T* w, const float* bias, float* out, int M, int N, int K,
                       int vec) {
    const int n = blockIdx.y * COLS_PER_BLOCK + threadIdx.x / WARP;
    const int row0 = blockIdx.x * TILE_ROWS;
    if (n >= N || row0 >= M) return;
    column_tile<P>(x, w, bias, out, row0, min(TILE_ROWS, M - row0), n, N, K, vec != 0);
}

// The grouped form. `x` holds the rows of every expert, grouped by expert; `tiles[3t ..]` is
// (expert slot, first row, rows) of tile t; `weights[e]` and `biases[e]` are the device
// addresses of slot e's matrix and bias (0: no bias). grid (tiles, ceil(N / COLS_PER_BLOCK)).
template <class P>
__device__ void grouped_linear(const float* x, const u64* weights, const u64* biases, const int* tiles, float* out,
                               int N, int K, int vec) {
    const int n = blockIdx.y * COLS_PER_BLOCK + threadIdx.x / WARP;
    if (n >= N) return;
    const int* t = tiles + 3 * blockIdx.x;
    const typename P::T* w = (const typename P::T*)weights[t[0]];
    const float* b = (const float*)biases[t[0]];
    column_tile<P>(x, w, b, out, t[1], t[2], n, N, K, vec != 0);
}

#define LINEAR_KERNELS(NAME, P)                                                                                   \
    extern "C" __global__ void linear_##NAME(const float* x, const P::T* w, const float* bias, float* out, int M,  \
                                             int N, int K, int vec) {                                              \
        linear<P>(x, w, bias, out, M, N, K, vec);                                                                  \
    }                                                                                                              \
    extern "C" __global__ void grouped_linear_##NAME(const float* x, const u64* weights, const u64* biases,       \
                                                     const int* tiles, float* out, int N, int K, int vec) {        \
        grouped_linear<P>(x, weights, biases, tiles, out, N, K, vec);                                              \
    }

LINEAR_KERNELS(bf16, PBf16)
LINEAR_KERNELS(f16, PF16)
LINEAR_KERNELS(f32, PF32)

// Activations rounded to bf16 for cuBLAS's bf16 products.
extern "C" __global__ void round_to_bf16(const float* x, u16* out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}

// out[m, n] += bias[n]
extern "C" __global__ void add_bias(float* out, const float* bias, int M, int N) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (long)M * N; i += (long)gridDim.x * blockDim.x)
        out[i] += bias[i % N];
}
