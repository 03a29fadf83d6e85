// Decode attention straight from the paged KV pool (model/paged_kv.py), on a GPU.
//
// One query per row (the row's newest token) attends over every cached token of its row:
// its context and what it generated, all before it, which is GLM's decode mask
// (docs/model.md, "Masks"), so nothing inside a row's length is masked. Keys and values
// are read where they lie in the pool, through the row's block table; nothing is gathered.
//
//   paged_decode_<t>(q, keys, values, tables, lens, out, heads, dim, block_size,
//                    max_blocks, slots)
//
//     q       fp32  [rows, heads, dim]   the queries, already scaled by 1/sqrt(dim)
//     keys    <t>   [heads, slots, dim]  one layer of the pool (slot = block * block_size + i)
//     values  <t>   [heads, slots, dim]
//     tables  int64 [rows, max_blocks]   each row's blocks, in token order
//     lens    int64 [rows]               each row's cached tokens (this step's write included);
//                                        0 = a padding row: its output is zeros
//     out     <t>   [rows, heads, dim]
//
//   grid (heads, rows), blockDim PA_THREADS, dynamic shared memory
//   max_blocks * block_size floats (the scores of the longest row the table can hold).
//
// Arithmetic as the official decode step and kernels/cpu_paged.py: fp32 scores, an fp32
// softmax (max subtracted), the probability-weighted sum of the values in fp32, rounded
// once to <t>. Lens are read on the device, so one launch serves any lengths: a CUDA
// graph captured once replays for every step (model/cuda_graphs.py).
//
// Work split: the score of token t is one warp's dot product (lanes over dim, a shuffle
// reduction); the weighted sum gives each warp a share of the tokens with each lane
// owning dim/32 accumulators, then one pass across warps through shared memory.
//
//   <t> = f32 | f16 | bf16.   Preconditions (checked by kernels/cuda_paged.py):
//   dim a multiple of 32 and at most PA_MAX_DIM; every pointer contiguous as above.
//
// No #include: fp16/bf16 are raw 16-bit storage converted with PTX `cvt` (sm_80+),
// as in quant_gemv.cu, so NVRTC needs no CUDA headers on the serving machine.
// With -DPA_ONLY -DPA_TNAME=<t> the runtime builds one dtype; without, all three.

#define PA_THREADS 128
#define PA_WARPS (PA_THREADS / 32)
#define PA_MAX_DIM 256
#define PA_PER_LANE (PA_MAX_DIM / 32)

typedef unsigned short pa_f16;
typedef unsigned short pa_bf16;

namespace pa {

struct F32 { typedef float T; };
struct F16 { typedef pa_f16 T; };
struct BF16 { typedef pa_bf16 T; };

template <typename Tag> struct Conv;
template <> struct Conv<F32> {
  static __device__ __forceinline__ float load(const float* p, long long i) { return __ldg(p + i); }
  static __device__ __forceinline__ float store(float a) { return a; }
};
template <> struct Conv<F16> {
  static __device__ __forceinline__ float load(const pa_f16* p, long long i) {
    const unsigned short h = __ldg(p + i);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
  static __device__ __forceinline__ pa_f16 store(float a) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(a));
    return h;
  }
};
template <> struct Conv<BF16> {
  static __device__ __forceinline__ float load(const pa_bf16* p, long long i) {
    return __uint_as_float(((unsigned int)__ldg(p + i)) << 16);
  }
  static __device__ __forceinline__ pa_bf16 store(float a) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(a));
    return h;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// The block's reduction of one value per thread (sum or max); every thread gets it.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();                      // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < PA_WARPS; ++w) r = kMax ? fmaxf(r, red[w]) : r + red[w];
  return r;
}

template <typename Tag>
__device__ __forceinline__ void decode(const float* __restrict__ q,
                                       const typename Tag::T* __restrict__ keys,
                                       const typename Tag::T* __restrict__ values,
                                       const long long* __restrict__ tables,
                                       const long long* __restrict__ lens,
                                       typename Tag::T* __restrict__ out,
                                       int heads, int dim, int block_size, int max_blocks,
                                       long long slots) {
  extern __shared__ float scores[];                     // [max_blocks * block_size]
  __shared__ float qs[PA_MAX_DIM];
  __shared__ float partial[PA_WARPS][PA_MAX_DIM];
  __shared__ float red[PA_WARPS];

  const int head = blockIdx.x, row = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long item = (long long)row * heads + head;
  typename Tag::T* o = out + item * dim;
  const long long len64 = lens[row];
  const long long cap = (long long)max_blocks * block_size;
  const int len = (int)(len64 > cap ? cap : len64);
  if (len <= 0) {                                       // a padding row
    for (int d = threadIdx.x; d < dim; d += PA_THREADS) o[d] = Conv<Tag>::store(0.0f);
    return;
  }
  for (int d = threadIdx.x; d < dim; d += PA_THREADS) qs[d] = q[item * dim + d];
  __syncthreads();

  const long long* table = tables + (long long)row * max_blocks;
  const long long base = (long long)head * slots;

  // Scores: token t is warp (t % PA_WARPS)'s dot product.
  float local_max = __int_as_float(0xff800000);   // -inf
  for (int t = warp; t < len; t += PA_WARPS) {
    const long long at = (base + table[t / block_size] * block_size + t % block_size) * dim;
    float s = 0.0f;
    for (int d = lane; d < dim; d += 32) s += qs[d] * Conv<Tag>::load(keys, at + d);
    s = warp_sum(s);
    if (lane == 0) scores[t] = s;
    local_max = fmaxf(local_max, s);
  }
  const float m = block_reduce<true>(local_max, red);   // its barrier publishes the scores

  float local_sum = 0.0f;
  for (int t = threadIdx.x; t < len; t += PA_THREADS) {
    const float e = __expf(scores[t] - m);
    scores[t] = e;
    local_sum += e;
  }
  const float total = block_reduce<false>(local_sum, red);   // and the weights

  // Weighted sum of the values: warp w takes tokens w, w + PA_WARPS, ...; lane l owns
  // dims l, l + 32, ...
  float acc[PA_PER_LANE];
#pragma unroll
  for (int j = 0; j < PA_PER_LANE; ++j) acc[j] = 0.0f;
  const int per_lane = dim / 32;
  for (int t = warp; t < len; t += PA_WARPS) {
    const long long at = (base + table[t / block_size] * block_size + t % block_size) * dim;
    const float w = scores[t];
#pragma unroll
    for (int j = 0; j < PA_PER_LANE; ++j)
      if (j < per_lane) acc[j] += w * Conv<Tag>::load(values, at + lane + 32 * j);
  }
#pragma unroll
  for (int j = 0; j < PA_PER_LANE; ++j)
    if (j < per_lane) partial[warp][lane + 32 * j] = acc[j];
  __syncthreads();
  const float inv = 1.0f / total;
  for (int d = threadIdx.x; d < dim; d += PA_THREADS) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < PA_WARPS; ++w) v += partial[w][d];
    o[d] = Conv<Tag>::store(v * inv);
  }
}

}  // namespace pa

#define PA_DEFINE(NAME, TAG)                                                                  \
  extern "C" __global__ void __launch_bounds__(PA_THREADS)                                   \
      paged_decode_##NAME(const float* q, const TAG::T* keys, const TAG::T* values,          \
                          const long long* tables, const long long* lens, TAG::T* out,       \
                          int heads, int dim, int block_size, int max_blocks, long long slots) { \
    pa::decode<TAG>(q, keys, values, tables, lens, out, heads, dim, block_size, max_blocks,   \
                    slots);                                                                   \
  }

#define PA_DEFINE_f32 PA_DEFINE(f32, pa::F32)
#define PA_DEFINE_f16 PA_DEFINE(f16, pa::F16)
#define PA_DEFINE_bf16 PA_DEFINE(bf16, pa::BF16)
#define PA_CAT(a, b) a##b
#define PA_DEFINE_ONE(name) PA_CAT(PA_DEFINE_, name)

#ifdef PA_ONLY
PA_DEFINE_ONE(PA_TNAME)
#else
PA_DEFINE_f32
PA_DEFINE_f16
PA_DEFINE_bf16
#endif
