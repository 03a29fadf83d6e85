// Fused dequantize-GEMV (decode) and weight dequantization (prefill) for the
// official GLM-130B weight-only format (see kernels/reference.py, which defines it):
//
//   values  int8 [N, K]     (8-bit), or [N, K/2] with two 4-bit values per byte:
//           element 2j in the HIGH nibble of byte j, element 2j+1 in the LOW nibble,
//           both two's complement (unpacked with sign-extending shifts).
//   scale   fp16 [N]        (official: one per output row), or
//           fp16 [N, K/g]   (group-wise option, g = group_size columns per scale).
//   W[n, k] = values[n, k] * scale[n] (or scale[n, k / g]).
//
// Kernels (all extern "C"; no torch or CUDA headers, see below):
//
//   qgemv_<t>_w<bits>_<scheme>_m<M>_r<R>(x, w, scale, y, N, K, group_size)
//       y[M, N] = x[M, K] @ W^T for M = 1..8 activation rows, fp32 accumulation.
//       One block owns R consecutive output rows; its threads stride over K in
//       16-byte chunks of packed weights (16 int8 or 32 int4 values per load),
//       dequantize in registers, FMA against x (fp16/bf16, read through the
//       read-only cache), then reduce with warp shuffles and one shared-memory
//       pass across warps. blockDim: a multiple of 32, at most 128.
//   qdequant_<t>_w<bits>_<scheme>(w, scale, out, N, K, group_size)
//       out[N, K] = W in fp16/bf16 (same rounding as the reference: q * s in
//       fp32, rounded once to the output type). Grid-stride over 16-byte chunks.
//
//   <t> = f16 | bf16, <bits> = 8 | 4, <scheme> = row | grp.
//
// Preconditions (checked by the host code, kernels/cuda.py): K * bits / 8 is a
// multiple of 16; all pointers are 16-byte aligned; x and y are contiguous
// [M, K] and [M, N]; for grp, group_size is a multiple of 16 (8-bit) or 32 (4-bit)
// and divides K.
//
// Compilation: with no -D flags every variant is instantiated with
// R = QG_DEFAULT_ROWS (what CI compiles with nvcc). The runtime (NVRTC) passes
//   -DQG_ONLY -DQG_TNAME=f16 -DQG_TAG=qg::F16 -DQG_BITS=8 -DQG_SCHEME=row
//   -DQG_GROUPED=0 -DQG_ROWS=4
// to build just the one family it needs.

// No #include at all: fp16/bf16 are handled as raw 16-bit storage and converted
// with PTX `cvt` (sm_80+), so NVRTC needs no CUDA headers on the target machine
// (pip's cupy + nvidia-cuda-nvrtc ship neither cuda_fp16.h nor cuda_bf16.h).

#ifndef QG_DEFAULT_ROWS
#define QG_DEFAULT_ROWS 4
#endif
#define QG_GEMV_MAX_THREADS 128  // GEMV blockDim bound (256 made ptxas spill at M = 6)

typedef unsigned short qg_f16;   // IEEE binary16 bits
typedef unsigned short qg_bf16;  // bfloat16 bits

namespace qg {

constexpr int kMaxWarps = QG_GEMV_MAX_THREADS / 32;

__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

// ---- activation / output conversions (tag types select fp16 or bf16) ------

struct F16 {};
struct BF16 {};
template <typename Tag> struct Pair;
template <> struct Pair<F16> {
  static __device__ __forceinline__ float2 to_float2(unsigned int u) {
    return make_float2(half_to_float((unsigned short)(u & 0xFFFFu)),
                       half_to_float((unsigned short)(u >> 16)));
  }
  static __device__ __forceinline__ unsigned int from_floats(float lo, float hi) {
    unsigned int d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
  }
  static __device__ __forceinline__ unsigned short from_float(float a) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(a));
    return h;
  }
};
template <> struct Pair<BF16> {
  static __device__ __forceinline__ float2 to_float2(unsigned int u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xFFFF0000u));
  }
  static __device__ __forceinline__ unsigned int from_floats(float lo, float hi) {
    unsigned int d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
  }
  static __device__ __forceinline__ unsigned short from_float(float a) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(a));
    return h;
  }
};

__device__ __forceinline__ unsigned int word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// ---- weight unpacking: one 32-bit word -> 32/BITS floats (exact integers) ---
// Integer -> float without I2F (quarter-rate on sm_80/90): place the biased value
// in the mantissa of 2^23 and subtract (2^23 + bias) with one FADD.

template <int BITS> struct Unpack;
template <> struct Unpack<8> {
  static constexpr int kPerWord = 4;
  static __device__ __forceinline__ void run(unsigned int w, float (&f)[4]) {
    const unsigned int u = w ^ 0x80808080u;  // int8 -> uint8 (v + 128)
#pragma unroll
    for (int i = 0; i < 4; ++i)  // bytes [u_i, 0, 0, 0x4B] = 2^23 + u_i
      f[i] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540 | i)) - 8388736.0f;
  }
};
template <> struct Unpack<4> {
  static constexpr int kPerWord = 8;
  static __device__ __forceinline__ void run(unsigned int w, float (&f)[8]) {
    const unsigned int u = w ^ 0x88888888u;  // int4 -> uint4 (v + 8) in every nibble
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // byte i = packed column: element 2i high nibble, 2i+1 low
      f[2 * i] = __uint_as_float(0x4B000000u | ((u >> (8 * i + 4)) & 0xFu)) - 8388616.0f;
      f[2 * i + 1] = __uint_as_float(0x4B000000u | ((u >> (8 * i)) & 0xFu)) - 8388616.0f;
    }
  }
};

// Load E consecutive activations (E = 4: 8 bytes, E = 8: 16 bytes) as floats.
template <typename T, int E> struct LoadX;  // T: F16 | BF16
template <typename T> struct LoadX<T, 4> {
  static __device__ __forceinline__ void run(const unsigned short* p, float (&f)[4]) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    const float2 a = Pair<T>::to_float2(v.x), b = Pair<T>::to_float2(v.y);
    f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
  }
};
template <typename T> struct LoadX<T, 8> {
  static __device__ __forceinline__ void run(const unsigned short* p, float (&f)[8]) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = Pair<T>::to_float2(word_of(v, j));
      f[2 * j] = a.x; f[2 * j + 1] = a.y;
    }
  }
};

// ---- fused dequantize-GEMV -------------------------------------------------

template <typename T, int BITS, bool GROUPED, int M, int R>
__device__ __forceinline__ void gemv(const unsigned short* __restrict__ x,
                                     const signed char* __restrict__ w,
                                     const qg_f16* __restrict__ scale, unsigned short* __restrict__ y,
                                     int N, int K, int group_size) {
  constexpr int E = Unpack<BITS>::kPerWord;  // elements per 32-bit word
  constexpr int EC = 4 * E;                  // elements per 16-byte chunk
  const int chunks = K / EC;                 // 16-byte chunks per weight row
  const int groups = GROUPED ? K / group_size : 1;
  const int n0 = blockIdx.x * R;

  const uint4* wrow[R];
  int nr[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    nr[r] = min(n0 + r, N - 1);  // rows past N recompute row N-1; never stored
    wrow[r] = reinterpret_cast<const uint4*>(w) + (long long)nr[r] * chunks;
  }

  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.0f;

  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    uint4 wv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wv[r] = __ldcs(wrow[r] + c);  // streamed: read once
    float s[R];
    if (GROUPED) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        s[r] = half_to_float(scale[(long long)nr[r] * groups + (c * EC) / group_size]);
    }
    const int k0 = c * EC;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float wf[R][E];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        Unpack<BITS>::run(word_of(wv[r], j), wf[r]);
        if (GROUPED) {
#pragma unroll
          for (int e = 0; e < E; ++e) wf[r][e] *= s[r];
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[E];
        LoadX<T, E>::run(x + (long long)m * K + k0 + j * E, xf);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int e = 0; e < E; ++e) acc[m][r] = fmaf(xf[e], wf[r][e], acc[m][r]);
      }
    }
  }

  // Warp reduction, then one pass across warps through shared memory.
  __shared__ float red[kMaxWarps][M * R];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp][m * R + r] = v;
    }
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  for (int i = threadIdx.x; i < M * R; i += blockDim.x) {
    const int m = i / R, n = n0 + i % R;
    if (n >= N) continue;
    float v = 0.0f;
    for (int q = 0; q < nwarps; ++q) v += red[q][i];
    if (!GROUPED) v *= half_to_float(scale[n]);
    y[(long long)m * N + n] = Pair<T>::from_float(v);
  }
}

// ---- dequantize to fp16/bf16 [N, K] (prefill: then cuBLAS) -----------------

template <typename T, int BITS, bool GROUPED>
__device__ __forceinline__ void dequant(const signed char* __restrict__ w,
                                        const qg_f16* __restrict__ scale,
                                        unsigned short* __restrict__ out,
                                        int N, int K, int group_size) {
  constexpr int E = Unpack<BITS>::kPerWord;
  constexpr int EC = 4 * E;
  const int chunks = K / EC;
  const int groups = GROUPED ? K / group_size : 1;
  const long long total = (long long)N * chunks;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int n = (int)(i / chunks), c = (int)(i - (long long)n * chunks);
    const uint4 wv = __ldcs(reinterpret_cast<const uint4*>(w) + i);
    const float s = half_to_float(GROUPED ? scale[(long long)n * groups + (c * EC) / group_size]
                                         : scale[n]);
    unsigned short* o = out + (long long)n * K + (long long)c * EC;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float f[E];
      Unpack<BITS>::run(word_of(wv, j), f);
      unsigned int p[E / 2];
#pragma unroll
      for (int e = 0; e < E / 2; ++e) p[e] = Pair<T>::from_floats(f[2 * e] * s, f[2 * e + 1] * s);
      if constexpr (E == 4) {
        *reinterpret_cast<uint2*>(o + j * E) = make_uint2(p[0], p[1]);
      } else {
        *reinterpret_cast<uint4*>(o + j * E) = make_uint4(p[0], p[1], p[2], p[3]);
      }
    }
  }
}

}  // namespace qg

// ---- explicit extern "C" instantiations ------------------------------------
// TN: name (f16 | bf16), TAG: qg::F16 | qg::BF16, B: bits, S: scheme name
// (row | grp), G: grouped (0 | 1), M: activation rows, R: output rows per block.

#define QG_GEMV_ENTRY(TN, TAG, B, S, G, M, R)                                             \
  extern "C" __global__ void __launch_bounds__(QG_GEMV_MAX_THREADS)                       \
      qgemv_##TN##_w##B##_##S##_m##M##_r##R(                                              \
          const unsigned short* __restrict__ x, const signed char* __restrict__ w,        \
          const qg_f16* __restrict__ scale, unsigned short* __restrict__ y, int N, int K, \
          int group_size) {                                                                \
    qg::gemv<TAG, B, (G) != 0, M, R>(x, w, scale, y, N, K, group_size);                   \
  }

#define QG_DEQUANT_ENTRY(TN, TAG, B, S, G)                                                 \
  extern "C" __global__ void __launch_bounds__(256) qdequant_##TN##_w##B##_##S(           \
      const signed char* __restrict__ w, const qg_f16* __restrict__ scale,                 \
      unsigned short* __restrict__ out, int N, int K, int group_size) {                    \
    qg::dequant<TAG, B, (G) != 0>(w, scale, out, N, K, group_size);                        \
  }

// QG_FAMILY does no pasting itself, so its arguments (possibly -D macros) are
// expanded before QG_GEMV_ENTRY / QG_DEQUANT_ENTRY paste them into names.
#define QG_FAMILY(TN, TAG, B, S, G, R)                                                     \
  QG_GEMV_ENTRY(TN, TAG, B, S, G, 1, R) QG_GEMV_ENTRY(TN, TAG, B, S, G, 2, R)              \
  QG_GEMV_ENTRY(TN, TAG, B, S, G, 3, R) QG_GEMV_ENTRY(TN, TAG, B, S, G, 4, R)              \
  QG_GEMV_ENTRY(TN, TAG, B, S, G, 5, R) QG_GEMV_ENTRY(TN, TAG, B, S, G, 6, R)              \
  QG_GEMV_ENTRY(TN, TAG, B, S, G, 7, R) QG_GEMV_ENTRY(TN, TAG, B, S, G, 8, R)              \
  QG_DEQUANT_ENTRY(TN, TAG, B, S, G)

#ifdef QG_ONLY  // the runtime builds one family: -DQG_TNAME=f16 -DQG_TAG=qg::F16 ...
QG_FAMILY(QG_TNAME, QG_TAG, QG_BITS, QG_SCHEME, QG_GROUPED, QG_ROWS)
#else  // everything, at the default rows per block (what CI compiles with nvcc)
QG_FAMILY(f16, qg::F16, 8, row, 0, QG_DEFAULT_ROWS)
QG_FAMILY(f16, qg::F16, 8, grp, 1, QG_DEFAULT_ROWS)
QG_FAMILY(f16, qg::F16, 4, row, 0, QG_DEFAULT_ROWS)
QG_FAMILY(f16, qg::F16, 4, grp, 1, QG_DEFAULT_ROWS)
QG_FAMILY(bf16, qg::BF16, 8, row, 0, QG_DEFAULT_ROWS)
QG_FAMILY(bf16, qg::BF16, 8, grp, 1, QG_DEFAULT_ROWS)
QG_FAMILY(bf16, qg::BF16, 4, row, 0, QG_DEFAULT_ROWS)
QG_FAMILY(bf16, qg::BF16, 4, grp, 1, QG_DEFAULT_ROWS)
#endif
