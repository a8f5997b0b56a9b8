// Linear layers `out[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n])` with weights in their stored
// format (bf16, f16, f32, MXFP4, FP8), and the grouped form MoE layers use: every local
// expert of a layer in one launch, each over the (variable) rows routed to it.
//
// One warp computes one output column for a tile of up to TILE_ROWS rows: it streams the
// weight row once in 16-byte packs and multiplies each pack with every row of the tile, so a
// decode step reads each weight once. Rows beyond a tile (prefill) re-read (and re-decode) the
// weight row, which is why large bf16 and f32 products go to cuBLAS instead (see
// `cuda::matmul`); quantized weights always run here.

#define TILE_ROWS 8
#define COLS_PER_BLOCK 8  // one per warp

// ---- row readers ----
//
// A reader is one weight row `n` in its stored format. `pack(p, o)` decodes its 16-byte pack
// p, PACK weights, into `o`; `at(k)` decodes weight k alone (rows that are not whole packs,
// or activations not 16-byte aligned). Readers are made from the matrix's values, its scales
// (quantized formats; unread otherwise), the row and the sizes, so one kernel template
// serves every format: a format is a reader and a kernel name.

// 16-bit weights (bf16 or f16, by their widening `C::f32`): eight to a pack.
template <class C>
struct RowHalf {
    enum { PACK = 8 };
    const u16* __restrict__ w;
    __device__ __forceinline__ RowHalf(const void* values, const void*, int n, int K, int, int)
        : w((const u16*)values + (long)n * K) {}
    __device__ __forceinline__ void pack(int p, float* o) const {
        uint4 r = __ldg((const uint4*)w + p);
        u32 v[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            o[2 * i] = C::f32((u16)(v[i] & 0xffffu));
            o[2 * i + 1] = C::f32((u16)(v[i] >> 16));
        }
    }
    __device__ __forceinline__ float at(int k) const { return C::f32(w[k]); }
};
struct Bf16 { static __device__ __forceinline__ float f32(u16 b) { return bf16_to_f32(b); } };
struct F16 { static __device__ __forceinline__ float f32(u16 h) { return f16_to_f32(h); } };
typedef RowHalf<Bf16> RowBf16;
typedef RowHalf<F16> RowF16;

struct RowF32 {
    enum { PACK = 4 };
    const float* __restrict__ w;
    __device__ __forceinline__ RowF32(const void* values, const void*, int n, int K, int, int)
        : w((const float*)values + (long)n * K) {}
    __device__ __forceinline__ void pack(int p, float* o) const {
        float4 r = __ldg((const float4*)w + p);
        o[0] = r.x;
        o[1] = r.y;
        o[2] = r.z;
        o[3] = r.w;
    }
    __device__ __forceinline__ float at(int k) const { return w[k]; }
};

// The quantized formats' element decoders: the values of `quant::E2M1`, `quant::e8m0` and
// `quant::FP8_E4M3`, built from their bits (exact, no table lookups to diverge on).

// E2M1 (sign, 2 exponent bits, 1 mantissa bit): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives.
// For exponent e > 0 the f32 has exponent e - 1 + 127 and mantissa m: ((e:m) + 252) << 22.
__device__ __forceinline__ float e2m1(u32 nibble) {
    const u32 em = nibble & 7u;
    const u32 magnitude = em == 0u ? 0u : em == 1u ? 0x3f000000u /* 0.5 */ : (em + 252u) << 22;
    return __uint_as_float(magnitude | (nibble & 8u) << 28);
}

// E8M0: 2^(s - 127). 0 is 2^-127, a subnormal; 255 gives 2^128, infinity, as on the CPU.
__device__ __forceinline__ float e8m0(u32 s) { return __uint_as_float(s == 0u ? 1u << 22 : s << 23); }

// float8_e4m3fn (bias 7, no infinities, S.1111.111 NaN): subnormals are m · 2^-9, normals
// move exponent and mantissa into an f32's, re-biased by 120.
__device__ __forceinline__ float e4m3(u32 b) {
    const u32 em = b & 0x7fu;
    u32 magnitude = em < 8u ? __float_as_uint((float)em * 0.001953125f) : (em << 20) + (120u << 23);
    if (em == 0x7fu) magnitude = 0x7fc00000u;
    return __uint_as_float(magnitude | (b & 0x80u) << 24);
}

// MXFP4: a row is K / 32 blocks of 16 bytes (32 E2M1 values, the low nibble first) and K / 32
// E8M0 scale bytes. A pack is one block: its 16 bytes and its one scale.
struct RowMxfp4 {
    enum { PACK = 32 };
    const u8* __restrict__ v;
    const u8* __restrict__ s;
    __device__ __forceinline__ RowMxfp4(const void* values, const void* scales, int n, int K, int, int)
        : v((const u8*)values + (long)n * (K / 2)), s((const u8*)scales + (long)n * (K / 32)) {}
    __device__ __forceinline__ void pack(int p, float* o) const {
        const uint4 r = __ldg((const uint4*)v + p);
        const float scale = e8m0(s[p]);
        const u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 byte = (w[i] >> (8 * j)) & 0xffu;
                o[8 * i + 2 * j] = e2m1(byte & 0xfu) * scale;
                o[8 * i + 2 * j + 1] = e2m1(byte >> 4) * scale;
            }
        }
    }
    __device__ __forceinline__ float at(int k) const {
        const u32 byte = v[k / 2];
        return e2m1(k % 2 == 0 ? byte & 0xfu : byte >> 4) * e8m0(s[k / 32]);
    }
};

// FP8: a row is K e4m3 bytes; `f32` scales cover b0 × b1 blocks, ceil(K / b1) to a row of
// blocks (edge blocks partial). A pack is 16 values; where b1 is a multiple of 16 they share
// one scale, otherwise each looks its own up.
struct RowFp8 {
    enum { PACK = 16 };
    const u8* __restrict__ v;
    const float* __restrict__ s;
    int b1;
    __device__ __forceinline__ RowFp8(const void* values, const void* scales, int n, int K, int b0, int b1)
        : v((const u8*)values + (long)n * K),
          s((const float*)scales + (long)(n / b0) * (K / b1 + (K % b1 != 0))),
          b1(b1) {}
    __device__ __forceinline__ void pack(int p, float* o) const {
        const uint4 r = __ldg((const uint4*)v + p);
        const u32 w[4] = {r.x, r.y, r.z, r.w};
        const int k0 = p * PACK;
        const float whole = b1 % PACK == 0 ? s[k0 / b1] : 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int e = 4 * i + j;
                const float scale = b1 % PACK == 0 ? whole : s[(k0 + e) / b1];
                o[e] = e4m3((w[i] >> (8 * j)) & 0xffu) * scale;
            }
        }
    }
    __device__ __forceinline__ float at(int k) const { return e4m3(v[k]) * s[k / b1]; }
};

// ---- products ----

// Column `n` of rows `row0 .. row0 + rows` (rows <= TILE_ROWS), by the calling warp, from
// its weight row `w`. `vec`: K is a multiple of the pack and the rows are 16-byte aligned, so
// packs may be used.
template <class R>
__device__ __forceinline__ void column_tile(const float* __restrict__ x, const R& w, const float* __restrict__ bias,
                                            float* __restrict__ out, int row0, int rows, int n, int N, int K,
                                            bool vec) {
    const int lane = threadIdx.x % WARP;
    float acc[TILE_ROWS];
#pragma unroll
    for (int r = 0; r < TILE_ROWS; ++r) acc[r] = 0.0f;

    int k0 = 0;
    if (vec) {
        const int packs = K / R::PACK;
        for (int p = lane; p < packs; p += WARP) {
            float wv[R::PACK];
            w.pack(p, wv);
#pragma unroll
            for (int r = 0; r < TILE_ROWS; ++r) {
                if (r < rows) {
                    const float* xr = x + (long)(row0 + r) * K + (long)p * R::PACK;
                    float s = 0.0f;
#pragma unroll
                    for (int j = 0; j < R::PACK; j += 4) {
                        float4 xv = *(const float4*)(xr + j);
                        s += wv[j] * xv.x + wv[j + 1] * xv.y + wv[j + 2] * xv.z + wv[j + 3] * xv.w;
                    }
                    acc[r] += s;
                }
            }
        }
        k0 = packs * R::PACK;
    }
    for (int k = k0 + lane; k < K; k += WARP) {
        float wv = w.at(k);
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
// tiles go on x, whose limit is 2^31 - 1 (y stops at 65535). `scales`, `b0` and `b1` are the
// quantized formats' (see the readers; unread for dense ones).
template <class R>
__device__ void linear(const float* x, const void* w, const void* scales, const float* bias, float* out, int M, int N,
                       int K, int b0, int b1, int vec) {
    const int n = blockIdx.y * COLS_PER_BLOCK + threadIdx.x / WARP;
    const int row0 = blockIdx.x * TILE_ROWS;
    if (n >= N || row0 >= M) return;
    const R row(w, scales, n, K, b0, b1);
    column_tile<R>(x, row, bias, out, row0, min(TILE_ROWS, M - row0), n, N, K, vec != 0);
}

// The grouped form. `x` holds the rows of every expert, grouped by expert; `tiles[3t ..]` is
// (expert slot, first row, rows) of tile t; `weights[e]`, `scales[e]` and `biases[e]` are the
// device addresses of slot e's matrix, its scales (0: a dense format) and bias (0: no bias).
// grid (tiles, ceil(N / COLS_PER_BLOCK)).
template <class R>
__device__ void grouped_linear(const float* x, const u64* weights, const u64* scales, const u64* biases,
                               const int* tiles, float* out, int N, int K, int b0, int b1, int vec) {
    const int n = blockIdx.y * COLS_PER_BLOCK + threadIdx.x / WARP;
    if (n >= N) return;
    const int* t = tiles + 3 * blockIdx.x;
    const R row((const void*)weights[t[0]], (const void*)scales[t[0]], n, K, b0, b1);
    const float* b = (const float*)biases[t[0]];
    column_tile<R>(x, row, b, out, t[1], t[2], n, N, K, vec != 0);
}

#define LINEAR_KERNELS(NAME, R)                                                                                    \
    extern "C" __global__ void linear_##NAME(const float* x, const void* w, const void* scales, const float* bias,  \
                                             float* out, int M, int N, int K, int b0, int b1, int vec) {           \
        linear<R>(x, w, scales, bias, out, M, N, K, b0, b1, vec);                                                   \
    }                                                                                                               \
    extern "C" __global__ void grouped_linear_##NAME(const float* x, const u64* weights, const u64* scales,        \
                                                     const u64* biases, const int* tiles, float* out, int N, int K, \
                                                     int b0, int b1, int vec) {                                     \
        grouped_linear<R>(x, weights, scales, biases, tiles, out, N, K, b0, b1, vec);                               \
    }

LINEAR_KERNELS(bf16, RowBf16)
LINEAR_KERNELS(f16, RowF16)
LINEAR_KERNELS(f32, RowF32)
LINEAR_KERNELS(mxfp4, RowMxfp4)
LINEAR_KERNELS(fp8, RowFp8)

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
