// The op's CUDA kernel: y = act_out(PW(DW(act_in(x))) + bias) + residual in one launch.
//
// NHWC tiles: a thread block owns kBM output pixels x kBN output channels and walks the input
// channels in slices of BK. For each slice it computes the depthwise 3x3 result of its pixels in
// fp32 registers, rounds it to the MMA operand type into shared memory (the intermediate never goes
// to global memory), takes the slice's pointwise weights into shared memory with cp.async, and
// multiplies on tensor cores (wmma; tf32 or plain FFMA for float32). A and B slices are double
// buffered, so one barrier per slice suffices and the weight copy of the next slice overlaps the
// product of this one. The accumulators then go through shared memory so that each thread can add
// bias, ReLU and residual to a run of consecutive channels and store them once, coalesced.
//
// Deterministic: every output element is one thread's fixed-order sum; no atomics, no split-K.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "sepconv_bn.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "sepconv_bn_cuda.cu needs sm_80 or newer (bf16 and tf32 tensor cores, cp.async)"
#endif

namespace xception_fast {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;        // 8 warps
constexpr int kBM = 64;              // output pixels per block
constexpr int kBN = 256;             // output channels per block: few re-computations of the depthwise slice
constexpr int kWarpM = 32;           // warps tile the block 2 (pixels) x 4 (channels)
constexpr int kWarpN = 64;
constexpr int kLdc = kBN + 4;        // fp32 staging of the accumulators, padded against bank conflicts

// Per element type: V elements make 16 bytes (one vector access); a slice is BK = 4 V input
// channels, so that the depthwise phase is exactly one (pixel, V channels) item per thread. Shared
// rows are padded by one vector so that consecutive rows start 80 bytes apart: the eight 16-byte
// row pieces that a wmma (ldmatrix) read takes at once then fall on distinct banks.
template <typename T>
struct Tile {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
  static constexpr int BK = 4 * V;
  static constexpr int LDS = BK + V;
  static constexpr size_t kABBytes = 2 * (kBM + kBN) * LDS * sizeof(T);  // double-buffered A and B
  static constexpr size_t kTapBytes = 3 * 9 * BK * sizeof(float);          // taps, three slices in flight
  static constexpr size_t kStagingBytes = kBM * kLdc * sizeof(float);
  static constexpr size_t kSmemBytes =
      kABBytes + kTapBytes > kStagingBytes ? kABBytes + kTapBytes : kStagingBytes;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16 bytes of T (16-byte aligned) as V floats.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ src, float (&out)[V]) {
  static_assert(V * sizeof(T) == 16, "one 16-byte access");
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
  T vals[V];
  memcpy(vals, &raw, sizeof(raw));
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = to_float(vals[e]);
}

// N floats from shared memory (N a multiple of 4, 16-byte aligned).
template <int N>
__device__ __forceinline__ void load_shared_floats(const float* src, float (&out)[N]) {
  static_assert(N % 4 == 0, "float4 accesses");
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    const float4 q = reinterpret_cast<const float4*>(src)[i];
    out[4 * i] = q.x;
    out[4 * i + 1] = q.y;
    out[4 * i + 2] = q.z;
    out[4 * i + 3] = q.w;
  }
}

// N floats from global memory (N a multiple of 4, 16-byte aligned).
template <int N>
__device__ __forceinline__ void load_floats(const float* __restrict__ src, float (&out)[N]) {
  static_assert(N % 4 == 0, "float4 accesses");
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(src) + i);
    out[4 * i] = q.x;
    out[4 * i + 1] = q.y;
    out[4 * i + 2] = q.z;
    out[4 * i + 3] = q.w;
  }
}

__device__ __forceinline__ uint32_t bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// V floats rounded to T and packed into 16 bytes, element 0 lowest, for one 16-byte store.
template <typename T, int V>
__device__ __forceinline__ uint4 pack_vec(const float (&in)[V]) {
  static_assert(V * sizeof(T) == 16, "one 16-byte access");
  constexpr int kPerWord = V / 4;
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = 0;
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) w[i] |= bits(from_float<T>(in[i * kPerWord + j])) << (16 * j);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One 16-byte shared store whatever the compiler makes of the uint4 (it split one into four).
__device__ __forceinline__ void st_shared_16(void* smem_dst, uint4 v) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Tensor-core product of one slice: As [kBM][LDS] row-major (pixel, k), Bs [kBN][LDS] holding B
// (k, out channel) column-major, i.e. the pointwise weight's own [Cout][C] order. Each warp owns a
// kWarpM x kWarpN block of the accumulators.
template <typename T, typename FragT, int WK>
struct WmmaMath {
  static constexpr bool kTf32 = std::is_same<FragT, wmma::precision::tf32>::value;
  static constexpr int kFm = kWarpM / 16;
  static constexpr int kFn = kWarpN / 16;
  static_assert((kBM / kWarpM) * (kBN / kWarpN) * 32 == kThreads, "one warp per accumulator block");
  wmma::fragment<wmma::accumulator, 16, 16, WK, float> acc[kFm][kFn];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < kFm; ++i)
#pragma unroll
      for (int j = 0; j < kFn; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  // One operand fragment from shared memory; TF32 wants every element rounded to tf32 first.
  template <typename Frag, typename Elem>
  static __device__ __forceinline__ void load_operand(Frag& frag, const Elem* src, unsigned ldm) {
    wmma::load_matrix_sync(frag, src, ldm);
    if constexpr (kTf32) {
#pragma unroll
      for (int t = 0; t < frag.num_elements; ++t) frag.x[t] = wmma::__float_to_tf32(frag.x[t]);
    }
  }

  template <int BK, int LDS>
  __device__ __forceinline__ void step(const T* As, const T* Bs, int tid) {
    const int warp = tid / 32;
    const T* a_warp = As + (warp / (kBN / kWarpN)) * kWarpM * LDS;
    const T* b_warp = Bs + (warp % (kBN / kWarpN)) * kWarpN * LDS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += WK) {
      wmma::fragment<wmma::matrix_a, 16, 16, WK, FragT, wmma::row_major> a[kFm];
      wmma::fragment<wmma::matrix_b, 16, 16, WK, FragT, wmma::col_major> b[kFn];
#pragma unroll
      for (int i = 0; i < kFm; ++i) load_operand(a[i], a_warp + i * 16 * LDS + kk, LDS);
#pragma unroll
      for (int j = 0; j < kFn; ++j) load_operand(b[j], b_warp + j * 16 * LDS + kk, LDS);
#pragma unroll
      for (int i = 0; i < kFm; ++i)
#pragma unroll
        for (int j = 0; j < kFn; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void stage(float* Cs, int tid) const {
    const int warp = tid / 32;
    float* c_warp = Cs + (warp / (kBN / kWarpN)) * kWarpM * kLdc + (warp % (kBN / kWarpN)) * kWarpN;
#pragma unroll
    for (int i = 0; i < kFm; ++i)
#pragma unroll
      for (int j = 0; j < kFn; ++j)
        wmma::store_matrix_sync(c_warp + i * 16 * kLdc + j * 16, acc[i][j], kLdc, wmma::mem_row_major);
  }
};

// Exact fp32 product (TF32 not allowed): thread (ty, tx) owns pixels 4 ty .. 4 ty + 3 and channels
// tx + 16 j; 16-byte reads along k, and consecutive tx read rows 80 bytes apart (no bank conflict).
struct FfmaMath {
  static constexpr int kRows = 4;
  static constexpr int kCols = 16;
  static_assert(kBM == 16 * kRows && kBN == 16 * kCols && kThreads == 256, "thread tile");
  float acc[kRows][kCols];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[i][j] = 0.0f;
  }

  template <int BK, int LDS>
  __device__ __forceinline__ void step(const float* As, const float* Bs, int tid) {
    const int tx = tid % 16, ty = tid / 16;
#pragma unroll
    for (int k = 0; k < BK; k += 4) {
      float4 a[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) a[i] = *reinterpret_cast<const float4*>(As + (ty * kRows + i) * LDS + k);
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const float4 b = *reinterpret_cast<const float4*>(Bs + (tx + 16 * j) * LDS + k);
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          acc[i][j] = fmaf(a[i].x, b.x, acc[i][j]);
          acc[i][j] = fmaf(a[i].y, b.y, acc[i][j]);
          acc[i][j] = fmaf(a[i].z, b.z, acc[i][j]);
          acc[i][j] = fmaf(a[i].w, b.w, acc[i][j]);
        }
      }
    }
  }

  __device__ __forceinline__ void stage(float* Cs, int tid) const {
    const int tx = tid % 16, ty = tid / 16;
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) Cs[(ty * kRows + i) * kLdc + tx + 16 * j] = acc[i][j];
  }
};

template <typename T>
struct Params {
  const T* x;         // NHWC [M][C]
  const float* taps;  // [9][C_pad], tap kh * 3 + kw, zero-padded
  const T* w;         // [Cout_pad][C_pad], zero-padded pointwise weight in the MMA operand type
  const float* bias;  // [Cout_pad], zero-padded
  const T* residual;  // NHWC [M][Cout] or nullptr
  T* out;             // NHWC [M][Cout]
  int64_t M, H, W, C, Cout, C_pad;
  int k_tiles, n_tiles;
  bool relu_input, relu_output;
  bool vec_x;    // C % V == 0 and x 16-byte aligned: whole-vector loads of x
  bool vec_out;  // Cout % V == 0 and out / residual 16-byte aligned
};

template <typename T, typename Math>
__global__ void __launch_bounds__(kThreads, 2) sepconv_bn_kernel(const Params<T> p) {
  constexpr int V = Tile<T>::V;
  constexpr int BK = Tile<T>::BK;
  constexpr int LDS = Tile<T>::LDS;
  constexpr int kGroups = BK / V;  // threads per pixel in the depthwise phase
  static_assert(kBM * kGroups == kThreads, "one depthwise item per thread and slice");

  extern __shared__ __align__(128) unsigned char smem[];
  T* const As = reinterpret_cast<T*>(smem);  // [2][kBM][LDS]
  T* const Bs = As + 2 * kBM * LDS;          // [2][kBN][LDS]
  float* const Ts = reinterpret_cast<float*>(smem + Tile<T>::kABBytes);  // [3][9][BK]
  float* const Cs = reinterpret_cast<float*>(smem);  // [kBM][kLdc], reuses everything after the last slice

  const int tid = threadIdx.x;
  // Consecutive blocks share a pixel tile, so x is read from DRAM once and re-read from L2.
  const int64_t n0 = static_cast<int64_t>(blockIdx.x % static_cast<unsigned>(p.n_tiles)) * kBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(p.n_tiles)) * kBM;

  // Depthwise item of this thread: pixel m0 + dw_row, channels dw_col .. dw_col + V - 1 of each slice.
  const int dw_row = tid / kGroups;
  const int dw_col = (tid % kGroups) * V;
  const int64_t pix = m0 + dw_row;
  unsigned tap_ok = 0;  // bit kh * 3 + kw: that input pixel exists (zero padding otherwise)
  if (pix < p.M) {
    const int64_t w = pix % p.W, h = (pix / p.W) % p.H;
#pragma unroll
    for (int kh = 0; kh < 3; ++kh)
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) {
        const int64_t ih = h + kh - 1, iw = w + kw - 1;
        if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) tap_ok |= 1u << (kh * 3 + kw);
      }
  }

  const int64_t x_center = pix * p.C;   // this pixel's channel 0; used only when pix < M
  const int64_t row_stride = p.W * p.C;  // one image row

  // Addresses are formed from the centre pointer of the slice, so that nothing per tap and
  // channel is loop-invariant: hoisted, such offsets would not fit in registers next to the
  // accumulators.
  auto depthwise = [&](int kt, T* a_buf, const float* t_buf) {
    const int64_t c = static_cast<int64_t>(kt) * BK + dw_col;
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.0f;
    if (tap_ok != 0 && c < p.C) {
      const T* xc = p.x + (x_center + c);
      // Channels past C: not read (their taps are zero-padded, their x may not exist).
      const int n_valid = p.C - c < V ? static_cast<int>(p.C - c) : V;
#pragma unroll
      for (int t = 0; t < 9; ++t) {
        if (tap_ok & (1u << t)) {
          const T* src = xc + (t / 3 - 1) * row_stride + (t % 3 - 1) * p.C;
          float xv[V], tv[V];
          if (p.vec_x) {
            load_vec<T, V>(src, xv);
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) xv[e] = e < n_valid ? to_float(src[e]) : 0.0f;
          }
          load_shared_floats<V>(t_buf + t * BK + dw_col, tv);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float v = (p.relu_input && xv[e] < 0.0f) ? 0.0f : xv[e];
            acc[e] = fmaf(v, tv[e], acc[e]);
          }
        }
      }
    }
    st_shared_16(a_buf + dw_row * LDS + dw_col, pack_vec<T, V>(acc));
  };

  auto load_weights = [&](int kt, T* b_buf) {
    constexpr int kChunksPerRow = BK / V;
    constexpr int kChunks = kBN * kChunksPerRow;
    static_assert(kChunks % kThreads == 0, "whole rounds of 16-byte copies");
    const T* src = p.w + n0 * p.C_pad + static_cast<int64_t>(kt) * BK;
#pragma unroll
    for (int round = 0; round < kChunks / kThreads; ++round) {
      const int i = round * kThreads + tid;
      const int row = i / kChunksPerRow, q = (i % kChunksPerRow) * V;
      cp_async_16(b_buf + row * LDS + q, src + row * p.C_pad + q);
    }
  };

  // The depthwise phase of slice kt runs before that slice's barrier, so its taps are copied two
  // slices ahead; the weights, needed only after the barrier, one slice ahead.
  auto load_taps = [&](int kt, float* t_buf) {
    constexpr int kChunksPerTap = BK / 4;
    if (tid < 9 * kChunksPerTap) {
      const int t = tid / kChunksPerTap, q = (tid % kChunksPerTap) * 4;
      cp_async_16(t_buf + t * BK + q, p.taps + t * p.C_pad + static_cast<int64_t>(kt) * BK + q);
    }
  };
  static_assert(9 * (BK / 4) <= kThreads, "one round of tap copies");

  Math math;
  math.init();
  load_taps(0, Ts);
  if (p.k_tiles > 1) load_taps(1, Ts + 9 * BK);
  load_weights(0, Bs);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  for (int kt = 0; kt < p.k_tiles; ++kt) {
    const int buf = kt & 1;
    T* const a_buf = As + buf * kBM * LDS;
    T* const b_buf = Bs + buf * kBN * LDS;
    // A buffer `buf` was last read by the product of slice kt - 2, which every warp finished
    // before the barrier of slice kt - 1; the taps of slice kt arrived before that barrier too.
    depthwise(kt, a_buf, Ts + (kt % 3) * 9 * BK);
    cp_async_wait_all();
    __syncthreads();
    // Past this barrier every warp is done with slice kt - 1: its B buffer and its tap buffer
    // (the one of slice kt + 2) can be refilled.
    if (kt + 1 < p.k_tiles) load_weights(kt + 1, Bs + (buf ^ 1) * kBN * LDS);
    if (kt + 2 < p.k_tiles) load_taps(kt + 2, Ts + ((kt + 2) % 3) * 9 * BK);
    cp_async_commit();
    math.template step<BK, LDS>(a_buf, b_buf, tid);
  }
  __syncthreads();  // Cs overlays the operand buffers; every copy was waited for in the last slice
  math.stage(Cs, tid);
  __syncthreads();

  // Epilogue: a thread takes V consecutive channels, a warp whole row segments, so loads of the
  // residual and stores of the output are contiguous.
  constexpr int kThreadsPerRow = kBN / V;
  constexpr int kRowsPerPass = kThreads / kThreadsPerRow;
  static_assert(kThreads % kThreadsPerRow == 0 && kBM % kRowsPerPass == 0, "epilogue mapping");
  const int col = (tid % kThreadsPerRow) * V;
  const int64_t n = n0 + col;
  float bias[V];
  load_floats<V>(p.bias + n, bias);  // padded to whole tiles: always in bounds
  for (int r = tid / kThreadsPerRow; r < kBM; r += kRowsPerPass) {
    const int64_t m = m0 + r;
    if (m >= p.M) break;
    float v[V];
    load_shared_floats<V>(Cs + r * kLdc + col, v);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      v[e] += bias[e];
      if (p.relu_output && v[e] < 0.0f) v[e] = 0.0f;
    }
    const int64_t o = m * p.Cout + n;
    if (p.vec_out) {
      if (n < p.Cout) {  // Cout % V == 0: the vector is wholly inside or wholly past Cout
        if (p.residual != nullptr) {
          float rv[V];
          load_vec<T, V>(p.residual + o, rv);
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] += rv[e];
        }
        // The intrinsic keeps this one 16-byte store (a plain uint4 store was split into four).
        __stwb(reinterpret_cast<uint4*>(p.out + o), pack_vec<T, V>(v));
      }
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (n + e < p.Cout) {
          float y = v[e];
          if (p.residual != nullptr) y += to_float(p.residual[o + e]);
          p.out[o + e] = from_float<T>(y);
        }
      }
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, typename Math>
void launch(const at::Tensor& x_nhwc, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
            const std::optional<at::Tensor>& bias, const at::Tensor& res_nhwc, at::Tensor& out, bool relu_input,
            bool relu_output) {
  using Cfg = Tile<T>;
  const int64_t N = x_nhwc.size(0), C = x_nhwc.size(1), H = x_nhwc.size(2), W = x_nhwc.size(3);
  const int64_t Cout = pw_weight.size(0);
  const int64_t M = N * H * W;
  const int64_t k_tiles = (C + Cfg::BK - 1) / Cfg::BK;
  const int64_t n_tiles = (Cout + kBN - 1) / kBN;
  const int64_t m_tiles = (M + kBM - 1) / kBM;
  TORCH_CHECK(m_tiles * n_tiles <= INT_MAX, "sepconv_bn (CUDA kernel): too many output tiles (N*H*W = ", M,
              ", Cout = ", Cout, ") for one launch");
  TORCH_CHECK(k_tiles <= INT_MAX, "sepconv_bn (CUDA kernel): too many input channels (", C, ")");

  // Operands in the kernel's layouts, zero-padded to whole tiles so that their copies need neither
  // masks nor a ragged tail: fp32 taps [9][C_pad]; the pointwise weight [Cout_pad][C_pad] in the
  // MMA operand type; fp32 bias (zeros when absent).
  const auto f32 = x_nhwc.options().dtype(at::kFloat);
  at::Tensor taps = at::zeros({9, k_tiles * Cfg::BK}, f32);
  taps.narrow(1, 0, C).copy_(dw_weight.reshape({C, 9}).t());
  at::Tensor w = at::zeros({n_tiles * kBN, k_tiles * Cfg::BK}, x_nhwc.options());
  w.narrow(0, 0, Cout).narrow(1, 0, C).copy_(pw_weight.reshape({Cout, C}));
  auto bias_f = at::zeros({n_tiles * kBN}, f32);
  if (bias.has_value()) bias_f.narrow(0, 0, Cout).copy_(*bias);

  Params<T> params;
  params.x = static_cast<const T*>(x_nhwc.const_data_ptr());
  params.taps = taps.const_data_ptr<float>();
  params.w = static_cast<const T*>(w.const_data_ptr());
  params.bias = bias_f.const_data_ptr<float>();
  params.residual = res_nhwc.defined() ? static_cast<const T*>(res_nhwc.const_data_ptr()) : nullptr;
  params.out = static_cast<T*>(out.mutable_data_ptr());
  params.M = M;
  params.H = H;
  params.W = W;
  params.C = C;
  params.Cout = Cout;
  params.C_pad = k_tiles * Cfg::BK;
  params.k_tiles = static_cast<int>(k_tiles);
  params.n_tiles = static_cast<int>(n_tiles);
  params.relu_input = relu_input;
  params.relu_output = relu_output;
  params.vec_x = C % Cfg::V == 0 && aligned16(params.x);
  params.vec_out = Cout % Cfg::V == 0 && aligned16(params.out) &&
                   (params.residual == nullptr || aligned16(params.residual));

  const auto kernel = sepconv_bn_kernel<T, Math>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Cfg::kSmemBytes)));
  kernel<<<static_cast<unsigned>(m_tiles * n_tiles), kThreads, Cfg::kSmemBytes,
           at::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sepconv_bn_cuda(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                           const std::optional<at::Tensor>& bias, bool relu_input, bool relu_output,
                           const std::optional<at::Tensor>& residual) {
  check_sepconv_bn_args(x, dw_weight, pw_weight, bias, residual);
  TORCH_CHECK(x.is_cuda(), "sepconv_bn (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "sepconv_bn (CUDA kernel): needs compute capability 8.0 or newer, ", x.device(),
              " has ", props->major, ".", props->minor);

  auto [x_nhwc, res_nhwc, out, memory_format] = nhwc_operands(x, pw_weight, residual);
  if (out.numel() == 0) return out.contiguous(memory_format);

  switch (x.scalar_type()) {
    case at::kBFloat16:
      launch<__nv_bfloat16, WmmaMath<__nv_bfloat16, __nv_bfloat16, 16>>(x_nhwc, dw_weight, pw_weight, bias,
                                                                         res_nhwc, out, relu_input, relu_output);
      break;
    case at::kHalf:
      launch<__half, WmmaMath<__half, __half, 16>>(x_nhwc, dw_weight, pw_weight, bias, res_nhwc, out, relu_input,
                                                   relu_output);
      break;
    case at::kFloat:
      if (at::globalContext().allowTF32CuDNN()) {
        launch<float, WmmaMath<float, wmma::precision::tf32, 8>>(x_nhwc, dw_weight, pw_weight, bias, res_nhwc, out,
                                                                 relu_input, relu_output);
      } else {
        launch<float, FfmaMath>(x_nhwc, dw_weight, pw_weight, bias, res_nhwc, out, relu_input, relu_output);
      }
      break;
    default:
      TORCH_CHECK(false, "sepconv_bn (CUDA kernel): unsupported dtype ", x.scalar_type());
  }
  return out.contiguous(memory_format);
}

}  // namespace

TORCH_LIBRARY_IMPL(xception_fast, CUDA, m) { m.impl("sepconv_bn", &sepconv_bn_cuda); }

}  // namespace xception_fast
