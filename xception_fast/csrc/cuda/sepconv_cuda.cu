// The op's CUDA kernel, one launch for the whole unit:
//
//   y = act_out(PW(act_mid(DW(act_in(x)) + dw_bias)) + pw_bias) + residual
//
// NHWC tiles: a thread block owns kBM output pixels x kBN output channels and walks the input
// channels in slices of BK. For each slice it computes the k x k depthwise result of its pixels
// (any stride, padding and dilation) in fp32 registers, adds dw_bias, applies act_mid and rounds it
// to the MMA operand type into shared memory (the intermediate never goes to global memory), takes
// the slice's pointwise weights into shared memory with cp.async, and multiplies on tensor cores
// (wmma bf16 / fp16 / tf32, or plain FFMA for exact float32). A and B slices are double buffered,
// the depthwise taps (and dw_bias) triple buffered, so one barrier per slice suffices and the copies
// of the next slices overlap the product of this one. The accumulators then go through shared
// memory so that each thread can add pw_bias, act_out and the residual to a run of consecutive
// channels in fp32 and store them once, rounded once, coalesced.
//
// The weights come in gpu_pack's layout (xception_fast/gpu_pack.py, shared with the Triton
// kernel): C padded to a multiple of 64, Cout to 256, so the weight copies need no masks. With
// `packed` the call does no weight work at all; without it the same layout is built per call.
//
// k is a template parameter (the taps unrolled); stride, padding, dilation and the activations
// are runtime values, warp-uniform: one instantiation per (dtype / product, k).
//
// Deterministic: every output element is one thread's fixed-order sum; no atomics, no split-K.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "sepconv.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "sepconv_cuda.cu needs sm_80 or newer (bf16 and tf32 tensor cores, cp.async, max.NaN)"
#endif

namespace xception_fast {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // 8 warps
constexpr int kBM = 64;        // output pixels per block
constexpr int kBN = 256;       // output channels per block: few re-computations of the depthwise slice
constexpr int kWarpM = 32;     // warps tile the block 2 (pixels) x 4 (channels)
constexpr int kWarpN = 64;
constexpr int kLdc = kBN + 4;  // fp32 staging of the accumulators, padded against bank conflicts

// gpu_pack.py: C_MULTIPLE, COUT_MULTIPLE, and the header's fields past the shared ones.
constexpr int64_t kCMultiple = 64;
constexpr int64_t kCoutMultiple = 256;
enum GpuHeaderField : int64_t { kChannelsPadded = kHeaderLength, kOutChannelsPadded, kGpuHeaderLength };
constexpr int64_t kGpuPackedLength = 5;  // [header, taps, dw_bias, pw, pw_bias]
static_assert(kCoutMultiple % kBN == 0, "packed Cout covers whole output tiles");

constexpr int kMaxK = 7;
static_assert(kMaxK < 31, "a bit per row and per column of taps");

// One output pixel's input window: the offset in x of its first tap (which may lie in the padding:
// only taps inside x are read), and which of its rows and columns of taps are inside x - tap
// (kh, kw) is where bit kh of `rows` and bit kw of `cols` are set (the window is a rectangle, so
// is its part inside x). kExists (in `rows`) marks the pixels that are the output's: a tile's last
// pixels may be past N * Ho * Wo.
struct PixelWindow {
  static constexpr uint32_t kExists = 1u << 31;
  int64_t x_offset;
  uint32_t rows, cols;
};

// Per element type T and kernel size K: V elements make 16 bytes (one vector access); a slice is
// BK = 4 V input channels, so that the depthwise phase is exactly one (pixel, V channels) item per
// thread. Shared rows are padded by one vector so that consecutive rows start 80 bytes apart: the
// eight 16-byte row pieces that a wmma (ldmatrix) read takes at once then fall on distinct banks.
// The tap buffers hold K * K rows of BK fp32 taps and one row of dw_bias, for three slices.
template <typename T, int K>
struct Tile {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
  static constexpr int BK = 4 * V;
  static constexpr int LDS = BK + V;
  static constexpr int KK = K * K;
  static constexpr int kTapRows = KK + 1;  // the taps, then dw_bias
  static constexpr int kABBytes = 2 * (kBM + kBN) * LDS * static_cast<int>(sizeof(T));  // double-buffered A, B
  static constexpr int kTapBytes = 3 * kTapRows * BK * static_cast<int>(sizeof(float));
  static constexpr int kWindowBytes = kBM * static_cast<int>(sizeof(PixelWindow));
  static constexpr int kLoopBytes = kABBytes + kTapBytes + kWindowBytes;
  static constexpr int kStagingBytes = kBM * kLdc * static_cast<int>(sizeof(float));
  // The dynamic shared memory a launch requests: the operand, tap and window buffers of the slice
  // loop, which the staging of the accumulators overlays once the last slice is multiplied.
  static constexpr int kSmemBytes = kLoopBytes > kStagingBytes ? kLoopBytes : kStagingBytes;
  static_assert(kCMultiple % BK == 0, "slices never read past the packed C");
  static_assert(kABBytes % 16 == 0 && kTapBytes % 16 == 0, "tap and window buffers 16-byte aligned");
};

// ----------------------------------------------------------------------------------------------
// Element conversions and vector accesses

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
// threadIdx.x and blockIdx.x, read again wherever they are used: what each phase of the kernel
// derives from them (its offsets into shared and global memory) is then computed in that phase,
// not hoisted out of the slice loop and kept live across it in registers the accumulators need.
__device__ __forceinline__ int thread_index() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}
__device__ __forceinline__ unsigned block_index() {
  unsigned b;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(b));
  return b;
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// ----------------------------------------------------------------------------------------------
// Activations. Identity, ReLU and ReLU6 are a clamp to [lo, hi] with the NaN-propagating min/max
// of sm_80 (one instruction each; NaN stays NaN, as through torch's relu and relu6); Hardswish is
// v * clamp(v + 3, 0, 6) / 6.

__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float min_nan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) { return min_nan(max_nan(v, lo), hi); }
__device__ __forceinline__ float hardswish(float v) { return v * clamp_nan(v + 3.0f, 0.0f, 6.0f) * (1.0f / 6.0f); }

// One activation as runtime values (the same for every thread: its branch is uniform).
struct Activation {
  float lo, hi;
  bool is_hardswish;

  __device__ __forceinline__ float operator()(float v) const {
    return is_hardswish ? hardswish(v) : clamp_nan(v, lo, hi);
  }
};

Activation make_activation(Act act) {
  Activation a{-std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity(),
               act == Act::kHardswish};
  if (act == Act::kRelu || act == Act::kRelu6) a.lo = 0.0f;
  if (act == Act::kRelu6) a.hi = 6.0f;
  return a;
}

// act_in runs on every tap's load, k * k times per input element: the kernel picks one of three
// copies of the unrolled taps (a warp-uniform branch per slice), so that the identity costs
// nothing and a ReLU two instructions.
enum class InAct { kNone, kClamp, kHardswish };

template <InAct IA>
__device__ __forceinline__ float apply_in(float v, const Activation& a) {
  if constexpr (IA == InAct::kNone) {
    return v;
  } else if constexpr (IA == InAct::kClamp) {
    return clamp_nan(v, a.lo, a.hi);
  } else {
    return hardswish(v);
  }
}

// ----------------------------------------------------------------------------------------------
// The pointwise product of one slice

// Tensor-core product: As [kBM][LDS] row-major (pixel, k), Bs [kBN][LDS] holding B (k, out channel)
// column-major, i.e. the pointwise weight's own [Cout][C] order. Each warp owns a kWarpM x kWarpN
// block of the accumulators.
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
    // TF32: one k-step at a time, so that the next step's fragments are not loaded early into
    // registers the accumulators need.
    constexpr int kStepsUnrolled = kTf32 ? 1 : BK / WK;
#pragma unroll kStepsUnrolled
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
    // One k-step of four at a time: the next step's operands are not loaded early into registers
    // the accumulators need.
#pragma unroll 1
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

// ----------------------------------------------------------------------------------------------
// The kernel

template <typename T>
struct Params {
  const T* x;            // NHWC [N][H][W][C]
  const float* taps;     // [k * k][C_pad], tap (kh, kw) at row kh * k + kw, zero-padded
  const float* dw_bias;  // [C_pad], zero-padded
  const T* w;            // [Cout_pad][C_pad], zero-padded pointwise weight in the MMA operand type
  const float* pw_bias;  // [Cout_pad], zero-padded
  const T* residual;     // NHWC [M][Cout] or nullptr
  T* out;                // NHWC [M][Cout], M = N * Ho * Wo
  int64_t M, H, W, C, Ho, Wo, Cout, C_pad;
  int64_t stride, padding, dilation;
  int64_t col_step, row_step;  // dilation * C, dilation * W * C: from one tap to the next in a row, in a column
  int k_tiles, n_tiles;
  Activation act_in, act_mid, act_out;
  InAct in_kind;  // act_in's copy of the taps
  bool vec_x;     // C % V == 0 and x 16-byte aligned: whole-vector loads of x
  bool vec_out;   // Cout % V == 0 and out / residual 16-byte aligned
};

// The k x k taps of one (pixel, V channels) item, vector loads of x: tap (kh, kw) reads x at
// off + kh * row_step + kw * col_step where bit kh of `rows` and bit kw of `cols` are set (zero
// padding otherwise). The offsets are advanced tap by tap, not formed from products, so that none
// of them is a loop-invariant value the compiler could hoist out of the slice loop (49 such int64
// values would not fit in registers next to the accumulators).
template <typename T, int K, int V, int BK, InAct IA>
__device__ __forceinline__ void taps_vec(const T* __restrict__ x, int64_t off, int64_t row_step, int64_t col_step,
                                         uint32_t rows, uint32_t cols, const float* t_buf, const Activation& act,
                                         float (&acc)[V]) {
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
    if ((rows >> kh) & 1u) {
      int64_t o = off;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        if ((cols >> kw) & 1u) {
          float xv[V], tv[V];
          load_vec<T, V>(x + o, xv);
          load_shared_floats<V>(t_buf + (kh * K + kw) * BK, tv);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = fmaf(apply_in<IA>(xv[e], act), tv[e], acc[e]);
        }
        o += col_step;
      }
    }
    off += row_step;
  }
}

// The same, for C not a multiple of V (or x not 16-byte aligned): scalar loads of the n_valid
// channels that exist, in a loop that is not unrolled (a rare path, kept small).
template <typename T, int K, int V, int BK>
__device__ __forceinline__ void taps_scalar(const T* __restrict__ x, int64_t off, int64_t row_step,
                                            int64_t col_step, uint32_t rows, uint32_t cols, const float* t_buf,
                                            const Activation& act, int n_valid, float (&acc)[V]) {
#pragma unroll 1
  for (int kh = 0; kh < K; ++kh) {
    if ((rows >> kh) & 1u) {
      int64_t o = off;
#pragma unroll 1
      for (int kw = 0; kw < K; ++kw) {
        if ((cols >> kw) & 1u) {
          float tv[V];
          load_shared_floats<V>(t_buf + (kh * K + kw) * BK, tv);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float xv = e < n_valid ? to_float(x[o + e]) : 0.0f;
            acc[e] = fmaf(act(xv), tv[e], acc[e]);
          }
        }
        o += col_step;
      }
    }
    off += row_step;
  }
}

// kDynamicSmem: the dynamic shared memory its launch requests (Tile<T, K>::kSmemBytes). It is a
// template argument so that it is part of the kernel's name, where ptxas' report shows it next to
// the kernel's registers and static shared memory: tests/test_cuda_build.py reads it there and
// checks it against the device limits without a GPU.
template <typename T, typename Math, int K, int kDynamicSmem>
__global__ void __launch_bounds__(kThreads, 2) sepconv_kernel(const Params<T> p) {
  using Cfg = Tile<T, K>;
  static_assert(kDynamicSmem == Cfg::kSmemBytes, "the launch requests the tile's shared memory");
  constexpr int V = Cfg::V;
  constexpr int BK = Cfg::BK;
  constexpr int LDS = Cfg::LDS;
  constexpr int KK = Cfg::KK;
  constexpr int kTapRows = Cfg::kTapRows;
  constexpr int kGroups = BK / V;  // threads per pixel in the depthwise phase
  static_assert(kBM * kGroups == kThreads, "one depthwise item per thread and slice");

  extern __shared__ __align__(128) unsigned char smem[];
  T* const As = reinterpret_cast<T*>(smem);  // [2][kBM][LDS]
  T* const Bs = As + 2 * kBM * LDS;          // [2][kBN][LDS]
  float* const Ts = reinterpret_cast<float*>(smem + Cfg::kABBytes);  // [3][kTapRows][BK]
  PixelWindow* const Ws = reinterpret_cast<PixelWindow*>(smem + Cfg::kABBytes + Cfg::kTapBytes);  // [kBM]
  float* const Cs = reinterpret_cast<float*>(smem);  // [kBM][kLdc], reuses everything after the last slice

  // The tile's first output channel and pixel. Consecutive blocks share a pixel tile, so x is read
  // from DRAM once and re-read from L2.
  auto first_channel = [&] { return static_cast<int64_t>(block_index() % static_cast<unsigned>(p.n_tiles)) * kBN; };
  auto first_pixel = [&] { return static_cast<int64_t>(block_index() / static_cast<unsigned>(p.n_tiles)) * kBM; };

  // Depthwise item of this thread: output pixel first_pixel() + dw_row(), channels dw_col() ..
  // dw_col() + V - 1 of each slice. The pixel's input window starts at (oh * s - p, ow * s - p);
  // tap (kh, kw) is at (kh * d, kw * d) from there. The window (PixelWindow) is found once per
  // pixel, into shared memory rather than registers, which the accumulators need across the slice
  // loop; the other threads of the pixel read it from the prologue's barrier on.
  auto dw_row = [] { return thread_index() / kGroups; };
  auto dw_col = [] { return thread_index() % kGroups * V; };
  if (thread_index() % kGroups == 0) {
    const int64_t pix = first_pixel() + dw_row();
    PixelWindow window{0, 0, 0};
    if (pix < p.M) {
      const int64_t ow = pix % p.Wo, t = pix / p.Wo;
      const int64_t oh = t % p.Ho, n = t / p.Ho;
      const int64_t ih0 = oh * p.stride - p.padding, iw0 = ow * p.stride - p.padding;
      window.rows = PixelWindow::kExists;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int64_t ih = ih0 + j * p.dilation, iw = iw0 + j * p.dilation;
        if (ih >= 0 && ih < p.H) window.rows |= 1u << j;
        if (iw >= 0 && iw < p.W) window.cols |= 1u << j;
      }
      window.x_offset = ((n * p.H + ih0) * p.W + iw0) * p.C;
    }
    Ws[dw_row()] = window;
  }

  // (The thread's row and column are read again after the taps, not kept live across them.)
  auto depthwise = [&](int kt, T* a_buf, const float* t_buf) {
    const int64_t c = static_cast<int64_t>(kt) * BK + dw_col();
    const PixelWindow window = Ws[dw_row()];
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.0f;
    if ((window.rows & PixelWindow::kExists) != 0 && c < p.C) {
      const float* tb = t_buf + dw_col();
      const uint32_t rows = window.rows & ~PixelWindow::kExists, cols = window.cols;
      if (rows != 0 && cols != 0) {
        const int64_t off = window.x_offset + c;
        if (p.vec_x) {
          switch (p.in_kind) {
            case InAct::kNone:
              taps_vec<T, K, V, BK, InAct::kNone>(p.x, off, p.row_step, p.col_step, rows, cols, tb, p.act_in, acc);
              break;
            case InAct::kClamp:
              taps_vec<T, K, V, BK, InAct::kClamp>(p.x, off, p.row_step, p.col_step, rows, cols, tb, p.act_in, acc);
              break;
            default:
              taps_vec<T, K, V, BK, InAct::kHardswish>(p.x, off, p.row_step, p.col_step, rows, cols, tb, p.act_in,
                                                       acc);
              break;
          }
        } else {
          // Channels past C: not read (their taps are zero-padded, their x may not exist).
          const int n_valid = p.C - c < V ? static_cast<int>(p.C - c) : V;
          taps_scalar<T, K, V, BK>(p.x, off, p.row_step, p.col_step, rows, cols, tb, p.act_in, n_valid, acc);
        }
      }
      // dw_bias (the tap buffer's last row) and act_mid in fp32, before the one rounding.
      float bias[V];
      load_shared_floats<V>(t_buf + dw_col() + KK * BK, bias);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = p.act_mid(acc[e] + bias[e]);
    }
    // Pixels past M and channels past C hold zeros (the padded weights are zero too).
    st_shared_16(a_buf + dw_row() * LDS + dw_col(), pack_vec<T, V>(acc));
  };

  auto load_weights = [&](int kt, T* b_buf) {
    constexpr int kChunksPerRow = BK / V;
    constexpr int kChunks = kBN * kChunksPerRow;
    static_assert(kChunks % kThreads == 0, "whole rounds of 16-byte copies");
    const T* src = p.w + first_channel() * p.C_pad + static_cast<int64_t>(kt) * BK;
    const int t = thread_index();
#pragma unroll
    for (int round = 0; round < kChunks / kThreads; ++round) {
      const int i = round * kThreads + t;
      const int row = i / kChunksPerRow, q = (i % kChunksPerRow) * V;
      cp_async_16(b_buf + row * LDS + q, src + row * p.C_pad + q);
    }
  };

  // The depthwise phase of slice kt runs before that slice's barrier, so its taps (and dw_bias)
  // are copied two slices ahead; the weights, needed only after the barrier, one slice ahead.
  auto load_taps = [&](int kt, float* t_buf) {
    constexpr int kChunksPerRow = BK / 4;
    constexpr int kChunks = kTapRows * kChunksPerRow;
    constexpr int kRounds = (kChunks + kThreads - 1) / kThreads;
    const int64_t c0 = static_cast<int64_t>(kt) * BK;
    const int t = thread_index();
#pragma unroll
    for (int round = 0; round < kRounds; ++round) {
      const int i = round * kThreads + t;
      if (kChunks % kThreads == 0 || i < kChunks) {
        const int row = i / kChunksPerRow, q = (i % kChunksPerRow) * 4;
        const float* src = row < KK ? p.taps + row * p.C_pad : p.dw_bias;
        cp_async_16(t_buf + row * BK + q, src + c0 + q);
      }
    }
  };

  Math math;
  math.init();
  load_taps(0, Ts);
  if (p.k_tiles > 1) load_taps(1, Ts + kTapRows * BK);
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
    depthwise(kt, a_buf, Ts + (kt % 3) * kTapRows * BK);
    cp_async_wait_all();
    __syncthreads();
    // Past this barrier every warp is done with slice kt - 1: its B buffer and its tap buffer
    // (the one of slice kt + 2) can be refilled.
    if (kt + 1 < p.k_tiles) load_weights(kt + 1, Bs + (buf ^ 1) * kBN * LDS);
    if (kt + 2 < p.k_tiles) load_taps(kt + 2, Ts + ((kt + 2) % 3) * kTapRows * BK);
    cp_async_commit();
    math.template step<BK, LDS>(a_buf, b_buf, thread_index());
  }
  __syncthreads();  // Cs overlays the operand buffers; every copy was waited for in the last slice
  math.stage(Cs, thread_index());
  __syncthreads();

  // Epilogue: a thread takes V consecutive channels, a warp whole row segments, so loads of the
  // residual and stores of the output are contiguous. pw_bias, act_out and the residual in fp32,
  // one rounding at the store.
  constexpr int kThreadsPerRow = kBN / V;
  constexpr int kRowsPerPass = kThreads / kThreadsPerRow;
  static_assert(kThreads % kThreadsPerRow == 0 && kBM % kRowsPerPass == 0, "epilogue mapping");
  const int tid = thread_index();
  const int col = (tid % kThreadsPerRow) * V;
  const int64_t n = first_channel() + col;
  const int64_t m0 = first_pixel();
  float bias[V];
  load_floats<V>(p.pw_bias + n, bias);  // padded to whole tiles: always in bounds
  for (int r = tid / kThreadsPerRow; r < kBM; r += kRowsPerPass) {
    const int64_t m = m0 + r;
    if (m >= p.M) break;
    float v[V];
    load_shared_floats<V>(Cs + r * kLdc + col, v);
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = p.act_out(v[e] + bias[e]);
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

// ----------------------------------------------------------------------------------------------
// Host side: the packed weights

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// gpu_pack.pack_gpu in C++, for calls without `packed`: the same layout, the same copies (so the
// same bits) - [header, taps [k*k][C_pad], dw_bias [C_pad], pw [Cout_pad][C_pad] in x's dtype,
// pw_bias [Cout_pad]], zero-padded.
std::vector<at::Tensor> pack_gpu(const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                                 const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias,
                                 const UnitShape& s, at::ScalarType dtype) {
  at::NoGradGuard no_grad;
  const int64_t C = s.C, Cout = s.Cout, k = s.k;
  const int64_t C_pad = round_up(C, kCMultiple), Cout_pad = round_up(Cout, kCoutMultiple);
  const auto f32 = dw_weight.options().dtype(at::kFloat);
  auto taps = at::zeros({k * k, C_pad}, f32);
  taps.narrow(1, 0, C).copy_(dw_weight.detach().reshape({C, k * k}).t());
  auto dw_b = at::zeros({C_pad}, f32);
  if (dw_bias.has_value()) dw_b.narrow(0, 0, C).copy_(dw_bias->detach());
  auto pw = at::zeros({Cout_pad, C_pad}, f32.dtype(dtype));
  pw.narrow(0, 0, Cout).narrow(1, 0, C).copy_(pw_weight.detach().reshape({Cout, C}));
  auto pw_b = at::zeros({Cout_pad}, f32);
  if (pw_bias.has_value()) pw_b.narrow(0, 0, Cout).copy_(pw_bias->detach());
  auto header = at::empty({kGpuHeaderLength}, at::dtype(at::kLong));
  auto* h = header.mutable_data_ptr<int64_t>();
  h[kFormat] = kGpuFormat;
  h[kChannels] = C;
  h[kOutChannels] = Cout;
  h[kKernelSize] = k;
  h[kProductDtype] = static_cast<int64_t>(dtype);
  h[kLayout] = 0;
  h[kChannelsPadded] = C_pad;
  h[kOutChannelsPadded] = Cout_pad;
  return {header, taps, dw_b, pw, pw_b};
}

struct GpuWeights {
  at::Tensor taps, dw_bias, pw, pw_bias;
  int64_t C_pad, Cout_pad;
};

// gpu_pack.check_packed_gpu in C++ (the same messages), and what the kernel's unmasked copies rely
// on besides: whole tiles of padding and 16-byte aligned rows. Reads the CPU header only.
GpuWeights check_packed_gpu(at::TensorList packed, const UnitShape& s, const at::Tensor& x) {
  const auto header = check_packed_header(packed, kGpuFormat, s, x.scalar_type(), kGpuPackedLength);
  constexpr const char* kNotLayout = "sepconv: packed weights do not hold this unit's tensors in the GPU layout";
  TORCH_CHECK_VALUE(static_cast<int64_t>(header.size()) >= kGpuHeaderLength, kNotLayout);
  GpuWeights g{packed[1], packed[2], packed[3], packed[4], header[kChannelsPadded], header[kOutChannelsPadded]};
  bool ok = g.C_pad >= s.C && g.C_pad % kCMultiple == 0 && g.Cout_pad >= s.Cout && g.Cout_pad % kCoutMultiple == 0;
  for (const at::Tensor* t : {&g.taps, &g.dw_bias, &g.pw, &g.pw_bias}) {
    ok = ok && t->defined() && t->device() == x.device() && t->is_contiguous() &&
         t->scalar_type() == (t == &g.pw ? x.scalar_type() : at::kFloat);
  }
  ok = ok && g.taps.sizes() == at::IntArrayRef({s.k * s.k, g.C_pad}) &&
       g.dw_bias.sizes() == at::IntArrayRef({g.C_pad}) && g.pw.sizes() == at::IntArrayRef({g.Cout_pad, g.C_pad}) &&
       g.pw_bias.sizes() == at::IntArrayRef({g.Cout_pad});
  TORCH_CHECK_VALUE(ok, kNotLayout);
  TORCH_CHECK_VALUE(aligned16(g.taps.const_data_ptr()) && aligned16(g.dw_bias.const_data_ptr()) &&
                        aligned16(g.pw.const_data_ptr()) && aligned16(g.pw_bias.const_data_ptr()),
                    "sepconv (CUDA kernel): packed weights must start at 16-byte aligned addresses (views into "
                    "other tensors may not): pack them again");
  return g;
}

// ----------------------------------------------------------------------------------------------
// Host side: the launch

template <typename T, typename Math, int K>
struct KernelOf {
  static constexpr int kSmemBytes = Tile<T, K>::kSmemBytes;
  static constexpr auto kernel = sepconv_kernel<T, Math, K, kSmemBytes>;
};

// cudaFuncSetAttribute once per kernel and device (the attribute is per device).
template <typename T, typename Math, int K>
void allow_shared_memory(int device) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(KernelOf<T, Math, K>::kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      KernelOf<T, Math, K>::kSmemBytes));
  done.fetch_or(bit, std::memory_order_relaxed);
}

InAct in_act_kind(Act act) {
  if (act == Act::kIdentity) return InAct::kNone;
  return act == Act::kHardswish ? InAct::kHardswish : InAct::kClamp;
}

template <typename T, typename Math, int K>
void launch_k(const UnitShape& s, const at::Tensor& x_nhwc, const GpuWeights& g, const at::Tensor& res_nhwc,
              at::Tensor& out) {
  using Cfg = Tile<T, K>;
  const int64_t M = s.N * s.Ho * s.Wo;
  const int64_t k_tiles = (s.C + Cfg::BK - 1) / Cfg::BK;
  const int64_t n_tiles = (s.Cout + kBN - 1) / kBN;
  const int64_t m_tiles = (M + kBM - 1) / kBM;
  TORCH_CHECK(m_tiles * n_tiles <= INT_MAX, "sepconv (CUDA kernel): too many output tiles (N*Ho*Wo = ", M,
              ", Cout = ", s.Cout, ") for one launch");
  TORCH_CHECK(k_tiles <= INT_MAX, "sepconv (CUDA kernel): too many input channels (", s.C, ")");

  Params<T> p;
  p.x = static_cast<const T*>(x_nhwc.const_data_ptr());
  p.taps = g.taps.const_data_ptr<float>();
  p.dw_bias = g.dw_bias.const_data_ptr<float>();
  p.w = static_cast<const T*>(g.pw.const_data_ptr());
  p.pw_bias = g.pw_bias.const_data_ptr<float>();
  p.residual = res_nhwc.defined() ? static_cast<const T*>(res_nhwc.const_data_ptr()) : nullptr;
  p.out = static_cast<T*>(out.mutable_data_ptr());
  p.M = M;
  p.H = s.H;
  p.W = s.W;
  p.C = s.C;
  p.Ho = s.Ho;
  p.Wo = s.Wo;
  p.Cout = s.Cout;
  p.C_pad = g.C_pad;
  p.stride = s.stride;
  p.padding = s.padding;
  p.dilation = s.dilation;
  p.col_step = s.dilation * s.C;
  p.row_step = s.dilation * s.W * s.C;
  p.k_tiles = static_cast<int>(k_tiles);
  p.n_tiles = static_cast<int>(n_tiles);
  p.act_in = make_activation(s.act_in);
  p.act_mid = make_activation(s.act_mid);
  p.act_out = make_activation(s.act_out);
  p.in_kind = in_act_kind(s.act_in);
  p.vec_x = s.C % Cfg::V == 0 && aligned16(p.x);
  p.vec_out = s.Cout % Cfg::V == 0 && aligned16(p.out) && (p.residual == nullptr || aligned16(p.residual));

  allow_shared_memory<T, Math, K>(x_nhwc.get_device());
  KernelOf<T, Math, K>::kernel<<<static_cast<unsigned>(m_tiles * n_tiles), kThreads, KernelOf<T, Math, K>::kSmemBytes,
                                 at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Math>
void launch(const UnitShape& s, const at::Tensor& x_nhwc, const GpuWeights& g, const at::Tensor& res_nhwc,
            at::Tensor& out) {
  switch (s.k) {
    case 1:
      return launch_k<T, Math, 1>(s, x_nhwc, g, res_nhwc, out);
    case 3:
      return launch_k<T, Math, 3>(s, x_nhwc, g, res_nhwc, out);
    case 5:
      return launch_k<T, Math, 5>(s, x_nhwc, g, res_nhwc, out);
    case 7:
      return launch_k<T, Math, 7>(s, x_nhwc, g, res_nhwc, out);
    default:
      TORCH_CHECK(false, "sepconv (CUDA kernel): no kernel for k = ", s.k);
  }
}

// ----------------------------------------------------------------------------------------------
// The op

at::Tensor sepconv_cuda(const at::Tensor& x, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                        const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias,
                        const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, int64_t dilation,
                        c10::string_view act_in, c10::string_view act_mid, c10::string_view act_out,
                        std::optional<at::TensorList> packed) {
  const UnitShape s = check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation,
                                 act_in, act_mid, act_out);
  TORCH_CHECK_VALUE(x.is_cuda(), "sepconv (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "sepconv (CUDA kernel): needs compute capability 8.0 or newer, ", x.device(),
              " has ", props->major, ".", props->minor);
  // The ATen calls inside (layout copies, the per-call packing) compute in the dtypes chosen here.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto [x_nhwc, res_nhwc, memory_format] = nhwc_operands(x, s, residual);
  auto out = nhwc_output(x, s);
  if (out.numel() == 0) return out.contiguous(memory_format);

  std::vector<at::Tensor> own;
  const at::TensorList weights = packed_or_packing(
      packed, own, [&] { return pack_gpu(dw_weight, dw_bias, pw_weight, pw_bias, s, x.scalar_type()); });
  const GpuWeights g = check_packed_gpu(weights, s, x);

  switch (x.scalar_type()) {
    case at::kBFloat16:
      launch<__nv_bfloat16, WmmaMath<__nv_bfloat16, __nv_bfloat16, 16>>(s, x_nhwc, g, res_nhwc, out);
      break;
    case at::kHalf:
      launch<__half, WmmaMath<__half, __half, 16>>(s, x_nhwc, g, res_nhwc, out);
      break;
    case at::kFloat:
      if (at::globalContext().allowTF32CuDNN()) {
        launch<float, WmmaMath<float, wmma::precision::tf32, 8>>(s, x_nhwc, g, res_nhwc, out);
      } else {
        launch<float, FfmaMath>(s, x_nhwc, g, res_nhwc, out);
      }
      break;
    default:
      TORCH_CHECK_VALUE(false, "sepconv (CUDA kernel): unsupported dtype ", x.scalar_type());
  }
  return out.contiguous(memory_format);
}

}  // namespace

TORCH_LIBRARY_IMPL(xception_fast, CUDA, m) { m.impl("sepconv", &sepconv_cuda); }

}  // namespace xception_fast
