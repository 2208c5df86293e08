// The fused separable unit's CPU kernel, its weight packing, and the max-pool with the residual add
// that follows a down-sampling block's last unit (max_pool_add, at the end of the kernels).
//
//   y = act_out(PW(act_mid(DW(act_in(x)) + dw_bias)) + pw_bias) + residual
//
// Two strategies for the pointwise product, chosen per unit when the weights are packed
// (choose_strategy says which and why):
//
// - tiled (fp32; bf16 and fp16 where the CPU has no instructions of their own to multiply them in,
//   choose_strategy): each thread takes tiles of output pixels (NHWC rows). A tile's depthwise result
//   is computed into a buffer that stays in the core's cache and multiplied by the packed
//   pointwise weights with oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm:
//   AVX2 or AVX-512, picked at run time), one block of output channels at a time, stored straight
//   into the output; bias, activation and residual are applied to each block while it is still in
//   the core's cache. The depthwise intermediate never goes to memory.
// - materialized: the depthwise result of the whole batch goes to memory once, in x's dtype, and
//   the product runs as one convolution over it: for bfloat16 oneDNN's 1x1 convolution with the
//   weights reordered once into its blocked layout and bias, activation and residual as its
//   post-ops (mkldnn::_convolution_pointwise, what torch.compile's CPU backend emits); otherwise
//   ATen's convolution, eager's own, then the epilogue. oneDNN's cache blocking of one large
//   product, for units whose arithmetic dwarfs the intermediate's bytes.
//
// Half-precision x: the depthwise result is rounded to x's dtype (where eager's separate depthwise
// conv rounds it), the product multiplies in that dtype with fp32 accumulation (AMX or AVX512-BF16
// where the CPU has them: oneDNN picks; fp32 FMAs on the widened values otherwise, exact products
// either way), the epilogue is fp32 and the output is rounded once. fp32
// x multiplies in fp32, or in bf16 where PyTorch's setting for oneDNN convolutions allows it
// (torch.backends.mkldnn.conv.fp32_precision = "bf16"), as nn.Conv2d does.
#include <unistd.h>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "sepconv.h"

namespace xception_fast {

namespace {

// ----------------------------------------------------------------------------------------------
// Element conversions and vectors

// Scalar bfloat16 <-> float, round to nearest even, NaN kept NaN (the channel tails).
template <typename to_t, typename from_t>
inline to_t elem_cast(from_t v) {
  return static_cast<to_t>(v);
}
template <>
inline float elem_cast<float, c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <>
inline c10::BFloat16 elem_cast<c10::BFloat16, float>(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// A float holding a value rounded to half_t (bfloat16, float16): the tiled product's depthwise rows
// for half-precision x on a CPU without that dtype's multiply instructions (choose_strategy), rounded
// where eager's depthwise conv rounds its result and kept widened for the fp32 product.
template <typename half_t>
struct RoundedFloat {
  float value;
};
template <>
inline RoundedFloat<c10::BFloat16> elem_cast<RoundedFloat<c10::BFloat16>, float>(float f) {
  return {elem_cast<float>(elem_cast<c10::BFloat16>(f))};
}
template <>
inline RoundedFloat<c10::Half> elem_cast<RoundedFloat<c10::Half>, float>(float f) {
  return {static_cast<float>(static_cast<c10::Half>(f))};
}

// The inner loops work on one vector of channels at a time, as wide as the instruction set they are
// compiled for has registers: 64 bytes with AVX-512, 32 with AVX2, 16 otherwise (SSE2, NEON). Each
// loop is compiled once per width (for_this_cpu, below). One width for all would not do: GCC keeps
// a vector wider than the target's registers in memory, and the AVX2 build of 64-byte loops ran
// the depthwise rows several times slower than eager's convolution.
// GCC vector types, one per (element type, width): the attribute cannot take a template parameter.
template <typename T, int VB>
struct VectorOf;
#define XF_VECTOR_TYPE(T, VB)                         \
  template <>                                         \
  struct VectorOf<T, VB> {                            \
    using type = T __attribute__((vector_size(VB))); \
  };
#define XF_VECTOR_TYPES(T) XF_VECTOR_TYPE(T, 8) XF_VECTOR_TYPE(T, 16) XF_VECTOR_TYPE(T, 32) XF_VECTOR_TYPE(T, 64)
XF_VECTOR_TYPES(float)
XF_VECTOR_TYPES(double)
XF_VECTOR_TYPES(uint32_t)
XF_VECTOR_TYPES(int32_t)
XF_VECTOR_TYPES(uint16_t)
XF_VECTOR_TYPES(_Float16)
#undef XF_VECTOR_TYPES
#undef XF_VECTOR_TYPE
template <typename T, int VB>
using vector_t = typename VectorOf<T, VB>::type;
// A vector of accumulators VB bytes wide, and its lanes.
template <typename acc_t, int VB>
using vec_of = vector_t<acc_t, VB>;
template <typename acc_t, int VB>
constexpr int64_t kLanes = VB / sizeof(acc_t);

// Half-precision conversions of a whole vector as vector operations (element by element they
// compile to scalar code, a branch per NaN check): bfloat16 by its bits, float16 through _Float16,
// which the AVX2 and AVX-512 builds convert with F16C instructions.
// bfloat16 -> float puts each 16-bit pattern in the high half of a 32-bit one: one interleave with
// zeros (a single permute with AVX-512, where widening then shifting takes five instructions).
template <int VB, size_t... I>
inline __attribute__((always_inline)) vec_of<float, VB> widen_bf16(const c10::BFloat16* src,
                                                                   std::index_sequence<I...>) {
  using half_bits = vector_t<uint16_t, VB / 2>;
  half_bits h;
  std::memcpy(&h, src, sizeof(h));
  const half_bits zero = {};
  // Lane 2i from zero (the low half of float i), lane 2i + 1 from h[i] (its high half).
  const vector_t<uint16_t, VB> interleaved =
      __builtin_shufflevector(zero, h, (I % 2 ? int(kLanes<float, VB>) + int(I / 2) : int(I / 2))...);
  vec_of<float, VB> v;
  std::memcpy(&v, &interleaved, sizeof(v));
  return v;
}
#if defined(__x86_64__) && defined(__GNUC__)
// AVX512-BF16 (Zen 4 and later, Intel since Cooper Lake) rounds 16 floats to bfloat16 in one
// instruction where the bit arithmetic below takes eight. It rounds to nearest even as that does;
// it flushes denormals to zero, as oneDNN's bf16 kernels (which use it) do.
const bool kCpuHasAvx512Bf16 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") != 0;
}();
#endif

template <int VB>
inline __attribute__((always_inline)) vector_t<uint16_t, VB / 2> bf16_bits(const vec_of<float, VB>& v) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (VB == 64) {
    if (kCpuHasAvx512Bf16) {
      vector_t<uint16_t, VB / 2> h;
      asm("vcvtneps2bf16 %1, %0" : "=v"(h) : "v"(v));
      return h;
    }
  }
#endif
  using bits32 = vector_t<uint32_t, VB>;
  bits32 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const bits32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vector_t<int32_t, VB> nan = v != v;
  return __builtin_convertvector(nan ? bits32{} + 0x7FC0u : rounded, vector_t<uint16_t, VB / 2>);
}

template <typename acc_t, int VB, typename scalar_t>
inline __attribute__((always_inline)) vec_of<acc_t, VB> load_vector(const scalar_t* src) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return widen_bf16<VB>(src, std::make_index_sequence<2 * kLanes<float, VB>>{});
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    vector_t<_Float16, VB / 2> h;
    std::memcpy(&h, src, sizeof(h));
    return __builtin_convertvector(h, vec_of<float, VB>);
  } else {
    static_assert(std::is_same_v<scalar_t, acc_t>, "no such conversion");
    vec_of<acc_t, VB> v;
    std::memcpy(&v, src, sizeof(v));
    return v;
  }
}

template <typename dst_t, typename acc_t, int VB>
inline __attribute__((always_inline)) void store_vector(dst_t* dst, const vec_of<acc_t, VB>& v) {
  if constexpr (std::is_same_v<dst_t, c10::BFloat16>) {
    const auto h = bf16_bits<VB>(v);
    std::memcpy(dst, &h, sizeof(h));
  } else if constexpr (std::is_same_v<dst_t, c10::Half>) {
    const auto h = __builtin_convertvector(v, vector_t<_Float16, VB / 2>);
    std::memcpy(dst, &h, sizeof(h));
  } else if constexpr (std::is_same_v<dst_t, RoundedFloat<c10::BFloat16>>) {
    const auto widened = __builtin_convertvector(bf16_bits<VB>(v), vector_t<uint32_t, VB>) << 16;
    std::memcpy(dst, &widened, sizeof(widened));
  } else if constexpr (std::is_same_v<dst_t, RoundedFloat<c10::Half>>) {
    const auto widened =
        __builtin_convertvector(__builtin_convertvector(v, vector_t<_Float16, VB / 2>), vec_of<float, VB>);
    std::memcpy(dst, &widened, sizeof(widened));
  } else {
    static_assert(std::is_same_v<dst_t, acc_t>, "no such conversion");
    std::memcpy(dst, &v, sizeof(v));
  }
}

// bfloat16 channels two vectors at a time, as the pairs of 16-bit values in each 32-bit lane: the even
// channel of a pair is the lane shifted up by 16 bits, the odd one the lane with its low 16 bits
// cleared. Two bitwise operations widen twice a vector's channels, where widen_bf16's interleave
// is a permute per vector, and on the depthwise rows (each input vector widened several times, once
// per window that reads it) those permutes compete with the FMAs for the vector pipes. The loops
// that use them keep the taps and bias in the same order, the even channels' vector first
// (depthwise_rows_impl).
template <int VB>
inline __attribute__((always_inline)) void widen_bf16_pairs(const c10::BFloat16* src, vec_of<float, VB>& even,
                                                            vec_of<float, VB>& odd) {
  using bits32 = vector_t<uint32_t, VB>;
  bits32 pairs;
  std::memcpy(&pairs, src, sizeof(pairs));
  const bits32 even_bits = pairs << 16, odd_bits = pairs & 0xFFFF0000u;
  std::memcpy(&even, &even_bits, sizeof(even));
  std::memcpy(&odd, &odd_bits, sizeof(odd));
}

// The inverse: the even and odd channels' vectors, each rounded as store_vector rounds, interleaved.
// With `stream`, a store that is a whole aligned vector bypasses the caches (a non-temporal store:
// no read of the line before it is written; the writer fences them, DepthwiseArgs::stream).
template <int VB, size_t... I>
inline __attribute__((always_inline)) void store_bf16_pairs(c10::BFloat16* dst, const vec_of<float, VB>& even,
                                                            const vec_of<float, VB>& odd, bool stream,
                                                            std::index_sequence<I...>) {
  const auto even_bits = bf16_bits<VB>(even), odd_bits = bf16_bits<VB>(odd);
  const vector_t<uint16_t, VB> interleaved =
      __builtin_shufflevector(even_bits, odd_bits, (I % 2 ? int(kLanes<float, VB>) + int(I / 2) : int(I / 2))...);
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (VB >= 32) {
    if (stream && reinterpret_cast<uintptr_t>(dst) % VB == 0) {
      asm volatile("vmovntdq %1, %0" : "=m"(*reinterpret_cast<char(*)[VB]>(dst)) : "v"(interleaved));
      return;
    }
  }
#endif
  std::memcpy(dst, &interleaved, sizeof(interleaved));
}

// Calls body(std::integral_constant<int, VB>{}) from a function compiled for the widest instruction
// set this CPU has, VB its vector width in bytes. The body and everything it calls must be inlined
// (always_inline): code out of line is compiled for the baseline instruction set. ATen's choice of
// instruction set caps it, so that ATEN_CPU_CAPABILITY=avx2 or =default picks the narrower loops
// here as it does ATen's own (that is how the tests run each build on one machine).
#if defined(__x86_64__) && defined(__GNUC__)
template <typename Body>
__attribute__((target("arch=x86-64-v4"))) void run_avx512(const Body& body) {
  body(std::integral_constant<int, 64>{});
}
template <typename Body>
__attribute__((target("arch=x86-64-v3"))) void run_avx2(const Body& body) {
  body(std::integral_constant<int, 32>{});
}
#endif

// The vector width for_this_cpu runs: 64, 32 or 16 bytes.
int vector_bytes() {
  static const int bytes = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    const std::string aten = at::get_cpu_capability();
    if (aten == "AVX512" && __builtin_cpu_supports("x86-64-v4")) return 64;
    if ((aten == "AVX512" || aten == "AVX2") && __builtin_cpu_supports("x86-64-v3")) return 32;
#endif
    return 16;
  }();
  return bytes;
}

template <typename Body>
inline void for_this_cpu(const Body& body) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (vector_bytes() == 64) return run_avx512(body);
  if (vector_bytes() == 32) return run_avx2(body);
#endif
  body(std::integral_constant<int, 16>{});
}

// ----------------------------------------------------------------------------------------------
// Activations: identity, ReLU and ReLU6 are a clamp to [lo, hi] written so that NaN stays NaN (as
// torch's), Hardswish is v * clamp(v + 3, 0, 6) / 6.

template <typename acc_t>
struct Activation {
  bool identity = true;
  bool hardswish = false;
  acc_t lo = -std::numeric_limits<acc_t>::infinity();
  acc_t hi = std::numeric_limits<acc_t>::infinity();

  explicit Activation(Act act) {
    identity = act == Act::kIdentity;
    hardswish = act == Act::kHardswish;
    if (act == Act::kRelu || act == Act::kRelu6) lo = 0;
    if (act == Act::kRelu6) hi = 6;
  }

  template <typename V>
  static inline __attribute__((always_inline)) V hardswish_of(V v) {
    V g = v + acc_t(3);
    g = g < acc_t(0) ? acc_t(0) : g;
    g = g > acc_t(6) ? acc_t(6) : g;
    return v * g * (acc_t(1) / acc_t(6));
  }

  template <typename V>
  inline __attribute__((always_inline)) V clamp(V v) const {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
  }

  template <typename V>
  inline __attribute__((always_inline)) V operator()(V v) const {
    if (identity) return v;  // the common case, a predictable branch in place of a clamp to +-inf
    return hardswish ? hardswish_of(v) : clamp(v);
  }
};

// The activation on x as a compile-time kind: it runs on every tap's load, k * k times per input
// element, where a clamp that does nothing still costs a vector operation. ReLU (Xception's)
// and none (the inverted residuals') are their own kinds; ReLU6 and Hardswish go through the
// runtime Activation.
enum class InAct { kNone, kRelu, kOther };

InAct in_act_kind(Act act) {
  if (act == Act::kIdentity) return InAct::kNone;
  return act == Act::kRelu ? InAct::kRelu : InAct::kOther;
}

// ReLU as one instruction where there is one: x86's max returns its second operand where either
// is NaN, and max(0, v) is then exactly v < 0 ? 0 : v (NaN and -0 kept), which GCC compiles to a
// compare and a masked move. In the AVX2 and AVX-512 builds only (VEX encoding).
template <typename acc_t, typename V>
inline __attribute__((always_inline)) V relu_of(V v) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<acc_t, float> && sizeof(V) >= 32) {
    V r;
    asm("vmaxps %1, %2, %0" : "=v"(r) : "v"(v), "v"(V{}));
    return r;
  }
#endif
  return v < acc_t(0) ? acc_t(0) : v;
}

template <InAct IA, typename acc_t, typename V>
inline __attribute__((always_inline)) V apply_in_act(V v, const Activation<acc_t>& act) {
  if constexpr (IA == InAct::kRelu) v = relu_of<acc_t>(v);
  if constexpr (IA == InAct::kOther) v = act(v);
  return v;
}

// ----------------------------------------------------------------------------------------------
// Depthwise

template <typename scalar_t, typename acc_t>
struct DepthwiseArgs {
  const scalar_t* x;       // NHWC [N][H][W][C]
  // [k * k][C] and [C], in channel order; for bfloat16 x, reordered within each whole pair of
  // vectors of channels as the loops read them (tap_pairs_for, pack_cpu_impl).
  const acc_t* taps;
  const acc_t* bias;
  int64_t N, C, H, W, Ho, Wo, k, stride, padding, dilation;
  Activation<acc_t> act_in, act_mid;
  // Whether the bfloat16 result goes past the caches (store_bf16_pairs; depthwise_rows fences the
  // stores before it returns): run_materialized says when.
  bool stream = false;
};

// Output pixels [p_begin, p_end) (flat NHWC indices of the output) into dst[p - p_begin][0, C),
// row stride ld_dst; the columns [C, ld_dst) are not touched. The pixels go one output row at a
// time: the taps' input rows that exist are found once per row (the others, padding, add
// nothing), and the row's interior columns, whose windows lie inside x, run in groups of kGroup
// pixels whose inputs are fixed strides apart, with no per-pixel bookkeeping; only the few border
// columns check each tap. Within a group the pixels walk the channels together, one vector at a
// time: every input row is read in order (what the hardware prefetchers follow), and each tap's
// vector, loaded once from L1, serves the whole group.
template <int VB, typename scalar_t, typename dst_t, typename acc_t, int KS, InAct IA>
inline __attribute__((always_inline)) void depthwise_rows_impl(const DepthwiseArgs<scalar_t, acc_t>& a,
                                                                int64_t p_begin, int64_t p_end,
                                                                dst_t* __restrict__ dst, int64_t ld_dst) {
  using vec_t = vec_of<acc_t, VB>;
  constexpr int64_t lanes = kLanes<acc_t, VB>;
  // Pixels per group: four independent chains of dependent FMAs in flight, and, at stride 1 with a
  // 3x3 window, each input vector loaded, widened and activated 1.5 times per output rather than 3
  // (overlapping, below); four accumulators leave most of AVX2's 16 registers free.
  constexpr int64_t kGroup = 4;
  constexpr int64_t kMaxK = 7;
  const int64_t k = KS > 0 ? KS : a.k;
  const int64_t C = a.C, W = a.W, stride = a.stride, pad = a.padding, dil = a.dilation;
  // Locals, so that the compiler keeps them in registers across the stores to dst.
  const Activation<acc_t> in = a.act_in, mid = a.act_mid;
  const acc_t* __restrict__ taps = a.taps;
  const acc_t* __restrict__ dw_bias = a.bias;
  // bfloat16 x: the channels two vectors at a time (widen_bf16_pairs), their taps and bias packed
  // in the same order, the even channels of each pair of vectors first; the channels past the last
  // whole pair take the loops below, their taps in channel order. A bfloat16 result (materialized)
  // is stored in channel order; the tiled product's rows keep the pairs' order, which the pointwise
  // weight's input channels are packed in (pack_cpu_impl).
  constexpr bool kPairs = std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr bool kPairsInterleaved = std::is_same_v<dst_t, c10::BFloat16>;
  const int64_t paired = kPairs ? C / (2 * lanes) * (2 * lanes) : 0;
  const bool stream = kPairsInterleaved && a.stream;
  // The lambdas are inlined by force: out of line they would be compiled outside the entry point's
  // AVX-512 / AVX2 build (for_this_cpu), for the baseline instruction set.
  auto finish = [&](auto v) __attribute__((always_inline)) { return mid(v); };
  // P vectors of channels from src, widened and activated: P = 2 for a pair of bfloat16 vectors
  // (widen_bf16_pairs, whose taps and bias are packed in the pairs' order), P = 1 otherwise.
  auto load_input = [&](const scalar_t* src, auto& v) __attribute__((always_inline)) {
    constexpr int64_t P = std::extent_v<std::remove_reference_t<decltype(v)>>;
    if constexpr (P == 2) {
      widen_bf16_pairs<VB>(src, v[0], v[1]);
    } else {
      v[0] = load_vector<acc_t, VB>(src);
    }
#pragma GCC unroll 2
    for (int64_t q = 0; q < P; ++q) v[q] = apply_in_act<IA, acc_t>(v[q], in);
  };
  // P vectors of the result, their sums plus the bias, to dst.
  auto store_result = [&](dst_t* dst, const auto& acc, const auto& bias) __attribute__((always_inline)) {
    constexpr int64_t P = std::extent_v<std::remove_reference_t<decltype(acc)>>;
    if constexpr (P == 2 && kPairsInterleaved) {
      store_bf16_pairs<VB>(dst, finish(acc[0] + bias[0]), finish(acc[1] + bias[1]), stream,
                           std::make_index_sequence<2 * lanes>{});
    } else if constexpr (P == 2) {
      store_vector<dst_t, acc_t, VB>(dst, finish(acc[0] + bias[0]));
      store_vector<dst_t, acc_t, VB>(dst + lanes, finish(acc[1] + bias[1]));
    } else {
      store_vector<dst_t, acc_t, VB>(dst, finish(acc[0] + bias[0]));
    }
  };
  // The output columns whose window lies inside x: ow * stride - pad >= 0 and
  // ow * stride - pad + (k - 1) * dil <= W - 1.
  const int64_t interior_first = (pad + stride - 1) / stride;
  const int64_t last_start = W - 1 - (k - 1) * dil + pad;
  const int64_t interior_last = last_start >= 0 ? last_start / stride : -1;

  const scalar_t* in_rows[kMaxK];  // this output row's input rows that exist
  int64_t tap_rows[kMaxK];          // their kh
  int64_t rows = 0;
  // The input row that the next output row reads and this one does not, or null: its lines are
  // prefetched into L2 while this row runs, one row ahead. Without it the first read of each new
  // input row waited on memory: the hardware prefetchers do not run that far ahead of a walk that
  // takes a few bytes from each of many pixels in turn.
  const scalar_t* next_row = nullptr;

  // Pixels [ow, ow + G) of the current output row, all interior, into out.
  auto interior = [&](auto group_size, int64_t ow, dst_t* __restrict__ out) __attribute__((always_inline)) {
    constexpr int64_t G = decltype(group_size)::value;
    const int64_t column = (ow * stride - pad) * C, pixel_step = stride * C, tap_step = dil * C;
    int64_t c0 = 0;
    // The channels P vectors at a time (load_input). S = 1 or 2: 3x3 and 5x5 windows at that
    // stride without dilation (every model's), where the group's windows overlap and each input
    // vector they share is loaded, widened and activated once, then serves every tap that reads
    // it. S = 0: any stride and dilation, each tap's input loaded on its own.
    auto channel_steps = [&](auto parts, auto stride_constant, int64_t c_end) __attribute__((always_inline)) {
      constexpr int64_t P = decltype(parts)::value;
      constexpr int64_t S = decltype(stride_constant)::value;
      for (; c0 + P * lanes <= c_end; c0 += P * lanes) {
        if (S > 0 && next_row != nullptr && (c0 * sizeof(scalar_t)) % 64 == 0) {
#pragma GCC unroll 8
          for (int64_t i = 0; i < G * S; ++i) __builtin_prefetch(next_row + column + i * C + c0, 0, 2);
        }
        vec_t acc[G][P] = {};
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* __restrict__ base = in_rows[r] + column + c0;
          const acc_t* __restrict__ tap_row = taps + tap_rows[r] * k * C + c0;
          if constexpr (S > 0) {
            // Column by column, so that one input vector is live at a time (AVX2 has 16
            // registers): each pixel's taps still add up in the order kw = 0, 1, ...
#pragma GCC unroll 16
            for (int64_t i = 0; i < (G - 1) * S + KS; ++i) {
              vec_t v[P];
              load_input(base + i * C, v);
#pragma GCC unroll 4
              for (int64_t g = 0; g < G; ++g) {
                const int64_t kw = i - g * S;
                if (kw >= 0 && kw < KS) {
#pragma GCC unroll 2
                  for (int64_t q = 0; q < P; ++q) {
                    acc[g][q] += v[q] * load_vector<acc_t, VB>(tap_row + kw * C + q * lanes);
                  }
                }
              }
            }
          } else {
#pragma GCC unroll 7
            for (int64_t kw = 0; kw < k; ++kw) {
              vec_t tap[P];
#pragma GCC unroll 2
              for (int64_t q = 0; q < P; ++q) tap[q] = load_vector<acc_t, VB>(tap_row + kw * C + q * lanes);
#pragma GCC unroll 4
              for (int64_t g = 0; g < G; ++g) {
                vec_t v[P];
                load_input(base + kw * tap_step + g * pixel_step, v);
#pragma GCC unroll 2
                for (int64_t q = 0; q < P; ++q) acc[g][q] += v[q] * tap[q];
              }
            }
          }
        }
        vec_t bias[P];
#pragma GCC unroll 2
        for (int64_t q = 0; q < P; ++q) bias[q] = load_vector<acc_t, VB>(dw_bias + c0 + q * lanes);
#pragma GCC unroll 4
        for (int64_t g = 0; g < G; ++g) store_result(out + g * ld_dst + c0, acc[g], bias);
      }
    };
    auto channel_vectors = [&](auto stride_constant) __attribute__((always_inline)) {
      if constexpr (kPairs) {
        channel_steps(std::integral_constant<int64_t, 2>{}, stride_constant, paired);
      }
      channel_steps(std::integral_constant<int64_t, 1>{}, stride_constant, C);
    };
    if constexpr (KS > 0) {
      if (dil == 1 && stride == 1) channel_vectors(std::integral_constant<int64_t, 1>{});
      if (dil == 1 && stride == 2) channel_vectors(std::integral_constant<int64_t, 2>{});
    }
    channel_vectors(std::integral_constant<int64_t, 0>{});
    for (; c0 < C; ++c0) {
      for (int64_t g = 0; g < G; ++g) {
        acc_t acc = 0;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t kw = 0; kw < k; ++kw) {
            const scalar_t v = in_rows[r][column + kw * tap_step + g * pixel_step + c0];
            acc += apply_in_act<IA, acc_t>(elem_cast<acc_t>(v), in) * taps[(tap_rows[r] * k + kw) * C + c0];
          }
        }
        out[g * ld_dst + c0] = elem_cast<dst_t>(finish(acc + dw_bias[c0]));
      }
    }
  };
  // One pixel near the left or right edge: each tap checks its column.
  auto border = [&](int64_t ow, dst_t* __restrict__ out) __attribute__((always_inline)) {
    const int64_t iw0 = ow * stride - pad;
    int64_t c0 = 0;
    auto channel_steps = [&](auto parts, int64_t c_end) __attribute__((always_inline)) {
      constexpr int64_t P = decltype(parts)::value;
      for (; c0 + P * lanes <= c_end; c0 += P * lanes) {
        vec_t acc[P] = {};
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t kw = 0; kw < k; ++kw) {
            const int64_t iw = iw0 + kw * dil;
            if (iw < 0 || iw >= W) continue;
            vec_t v[P];
            load_input(in_rows[r] + iw * C + c0, v);
#pragma GCC unroll 2
            for (int64_t q = 0; q < P; ++q) {
              acc[q] += v[q] * load_vector<acc_t, VB>(taps + (tap_rows[r] * k + kw) * C + c0 + q * lanes);
            }
          }
        }
        vec_t bias[P];
#pragma GCC unroll 2
        for (int64_t q = 0; q < P; ++q) bias[q] = load_vector<acc_t, VB>(dw_bias + c0 + q * lanes);
        store_result(out + c0, acc, bias);
      }
    };
    if constexpr (kPairs) channel_steps(std::integral_constant<int64_t, 2>{}, paired);
    channel_steps(std::integral_constant<int64_t, 1>{}, C);
    for (; c0 < C; ++c0) {
      acc_t acc = 0;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t kw = 0; kw < k; ++kw) {
          const int64_t iw = iw0 + kw * dil;
          if (iw < 0 || iw >= W) continue;
          acc += apply_in_act<IA, acc_t>(elem_cast<acc_t>(in_rows[r][iw * C + c0]), in) *
                 taps[(tap_rows[r] * k + kw) * C + c0];
        }
      }
      out[c0] = elem_cast<dst_t>(finish(acc + dw_bias[c0]));
    }
  };

  for (int64_t p = p_begin; p < p_end;) {
    const int64_t ow_begin = p % a.Wo, oh = (p / a.Wo) % a.Ho, n = p / (a.Wo * a.Ho);
    const int64_t count = std::min(p_end - p, a.Wo - ow_begin);  // pixels left in this output row
    rows = 0;
    for (int64_t kh = 0; kh < k; ++kh) {
      const int64_t ih = oh * stride - pad + kh * dil;
      if (ih < 0 || ih >= a.H) continue;
      in_rows[rows] = a.x + (n * a.H + ih) * W * C;
      tap_rows[rows++] = kh;
    }
    const int64_t ih_next = (oh + 1) * stride - pad + (k - 1) * dil;
    next_row = oh + 1 < a.Ho && ih_next < a.H ? a.x + (n * a.H + ih_next) * W * C : nullptr;
    dst_t* row_dst = dst + (p - p_begin) * ld_dst - ow_begin * ld_dst;  // where column 0 would go
    const int64_t ow_end = ow_begin + count;
    for (int64_t ow = ow_begin; ow < ow_end;) {
      if (ow < interior_first || ow > interior_last) {
        border(ow, row_dst + ow * ld_dst);
        ++ow;
        continue;
      }
      const int64_t run_end = std::min(ow_end, interior_last + 1);
      for (; ow + kGroup <= run_end; ow += kGroup) {
        interior(std::integral_constant<int64_t, kGroup>{}, ow, row_dst + ow * ld_dst);
      }
      if (kGroup > 2 && ow + 2 <= run_end) {
        interior(std::integral_constant<int64_t, 2>{}, ow, row_dst + ow * ld_dst);
        ow += 2;
      }
      if (ow < run_end) {
        interior(std::integral_constant<int64_t, 1>{}, ow, row_dst + ow * ld_dst);
        ++ow;
      }
    }
    p += count;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if (stream) asm volatile("sfence" ::: "memory");
#endif
}

// (x dtype, depthwise destination dtype, accumulator dtype): the depthwise result goes to memory in
// x's dtype (materialized), or to the fp32 tiles (tiled), rounded to x's dtype for half precision.
#define XF_FOR_EACH_DEPTHWISE(X)                                                                                \
  X(float, float, float) X(double, double, double) X(c10::BFloat16, c10::BFloat16, float)                       \
  X(c10::Half, c10::Half, float) X(c10::BFloat16, RoundedFloat<c10::BFloat16>, float)                           \
  X(c10::Half, RoundedFloat<c10::Half>, float)

template <int VB, typename scalar_t, typename dst_t, typename acc_t, InAct IA>
inline __attribute__((always_inline)) void depthwise_rows_for_act(const DepthwiseArgs<scalar_t, acc_t>& a,
                                                                   int64_t p_begin, int64_t p_end, dst_t* dst,
                                                                   int64_t ld_dst) {
  // The kernel sizes of the models (3: Xception, MobileNet; 5: EfficientNet, MnasNet) with their
  // taps unrolled; the others (1, 7) through the general loop.
  if (a.k == 3) {
    depthwise_rows_impl<VB, scalar_t, dst_t, acc_t, 3, IA>(a, p_begin, p_end, dst, ld_dst);
  } else if (a.k == 5) {
    depthwise_rows_impl<VB, scalar_t, dst_t, acc_t, 5, IA>(a, p_begin, p_end, dst, ld_dst);
  } else {
    depthwise_rows_impl<VB, scalar_t, dst_t, acc_t, 0, IA>(a, p_begin, p_end, dst, ld_dst);
  }
}

// One entry point per (x dtype, destination dtype), each running the loops built for this CPU.
#define XF_DEPTHWISE_ROWS(scalar_t, dst_t, acc_t)                                                            \
  void depthwise_rows(const DepthwiseArgs<scalar_t, acc_t>& a, InAct in_act, int64_t p_begin, int64_t p_end, \
                      dst_t* dst, int64_t ld_dst) {                                                          \
    for_this_cpu([&](auto vb) __attribute__((always_inline)) {                                               \
      constexpr int VB = decltype(vb)::value;                                                                \
      switch (in_act) {                                                                                      \
        case InAct::kNone:                                                                                   \
          return depthwise_rows_for_act<VB, scalar_t, dst_t, acc_t, InAct::kNone>(a, p_begin, p_end, dst,    \
                                                                                  ld_dst);                   \
        case InAct::kRelu:                                                                                   \
          return depthwise_rows_for_act<VB, scalar_t, dst_t, acc_t, InAct::kRelu>(a, p_begin, p_end, dst,    \
                                                                                  ld_dst);                   \
        case InAct::kOther:                                                                                  \
          return depthwise_rows_for_act<VB, scalar_t, dst_t, acc_t, InAct::kOther>(a, p_begin, p_end, dst,   \
                                                                                   ld_dst);                  \
      }                                                                                                      \
    });                                                                                                      \
  }
XF_FOR_EACH_DEPTHWISE(XF_DEPTHWISE_ROWS)
#undef XF_DEPTHWISE_ROWS

// ----------------------------------------------------------------------------------------------
// Depthwise backward: from the gradient at the depthwise conv's output (before its bias), the
// gradients of x and of the taps, with act_in's derivative and act_in(x) applied as x is read.
// Eager's backward materialises act_in(x) (recomputed here, where the forward did not keep it),
// runs the depthwise conv's backward on it and then act_in's backward over its result: three
// passes and two intermediates, where this is one pass that reads the gradient and x and writes
// the gradient of x.

template <typename scalar_t, typename acc_t>
struct DepthwiseBackwardArgs {
  const scalar_t* grad;  // NHWC [N][Ho][Wo][C]
  const scalar_t* x;     // NHWC [N][H][W][C]
  const acc_t* taps;     // [k * k][C]
  scalar_t* grad_x;      // NHWC [N][H][W][C], or null where it is not needed
  acc_t* grad_taps;      // [k * k][C], added to; or null where it is not needed
  int64_t N, C, H, W, Ho, Wo, k, stride, padding, dilation;
  Act act_in;
};

// act_in's derivative at x times g, with the kinks where eager's backward kernels put them
// (threshold_backward, hardtanh_backward, hardswish_backward). A NaN x passes g through, as their
// scalar loops do (their vector loops differ among themselves there).
template <typename acc_t, typename V>
inline __attribute__((always_inline)) V act_in_backward(V g, V x, Act act) {
  const V zero = {};
  if (act == Act::kRelu) return x <= acc_t(0) ? zero : g;
  if (act == Act::kRelu6) return (x <= acc_t(0)) | (x >= acc_t(6)) ? zero : g;
  if (act == Act::kHardswish) {
    const V inner = g * (x / acc_t(3) + acc_t(0.5));
    return x <= acc_t(-3) ? zero : (x < acc_t(3) ? inner : g);
  }
  return g;
}
template <typename acc_t>
inline acc_t act_in_backward_scalar(acc_t g, acc_t x, Act act) {
  if (act == Act::kRelu) return x <= acc_t(0) ? acc_t(0) : g;
  if (act == Act::kRelu6) return x <= acc_t(0) || x >= acc_t(6) ? acc_t(0) : g;
  if (act == Act::kHardswish) return x <= acc_t(-3) ? acc_t(0) : (x < acc_t(3) ? g * (x / acc_t(3) + acc_t(0.5)) : g);
  return g;
}

// Input rows [r_begin, r_end) (flat n * H + ih). Each input pixel gathers the gradient of the
// output pixels its taps reach; the same (input pixel, tap, output pixel) triples, each met once,
// sum the taps' gradient. A vector of channels at a time over a whole input row, the taps and
// their sums held in registers.
template <int VB, typename scalar_t, typename acc_t, int KS>
inline __attribute__((always_inline)) void depthwise_backward_rows_impl(
    const DepthwiseBackwardArgs<scalar_t, acc_t>& a, int64_t r_begin, int64_t r_end) {
  using vec_t = vec_of<acc_t, VB>;
  constexpr int64_t lanes = kLanes<acc_t, VB>;
  constexpr int64_t kMaxK = 7;
  constexpr int64_t kTaps = KS > 0 ? KS * KS : kMaxK * kMaxK;
  const int64_t k = KS > 0 ? KS : a.k;
  const int64_t C = a.C, W = a.W, Wo = a.Wo, stride = a.stride, pad = a.padding, dil = a.dilation;
  const Activation<acc_t> act(a.act_in);
  const Act act_kind = a.act_in;
  const acc_t* __restrict__ taps = a.taps;
  // The output column each (input column, kw) reaches, or -1.
  std::vector<int64_t> out_col(static_cast<size_t>(W * k));
  for (int64_t iw = 0; iw < W; ++iw) {
    for (int64_t kw = 0; kw < k; ++kw) {
      const int64_t o = iw + pad - kw * dil;
      out_col[iw * k + kw] = o >= 0 && o % stride == 0 && o / stride < Wo ? o / stride : -1;
    }
  }
  for (int64_t row = r_begin; row < r_end; ++row) {
    const int64_t n = row / a.H, ih = row % a.H;
    const scalar_t* g_rows[kMaxK];  // the output row each kh reaches, or null
    for (int64_t kh = 0; kh < k; ++kh) {
      const int64_t o = ih + pad - kh * dil;
      g_rows[kh] = o >= 0 && o % stride == 0 && o / stride < a.Ho ? a.grad + (n * a.Ho + o / stride) * Wo * C : nullptr;
    }
    const scalar_t* __restrict__ x_row = a.x + row * W * C;
    scalar_t* __restrict__ gx_row = a.grad_x ? a.grad_x + row * W * C : nullptr;
    int64_t c0 = 0;
    for (; c0 + lanes <= C; c0 += lanes) {
      vec_t tap[kTaps], sum[kTaps];
      for (int64_t t = 0; t < k * k; ++t) {
        tap[t] = load_vector<acc_t, VB>(taps + t * C + c0);
        sum[t] = vec_t{};
      }
      for (int64_t iw = 0; iw < W; ++iw) {
        const vec_t xv = load_vector<acc_t, VB>(x_row + iw * C + c0);
        const vec_t av = act(xv);
        vec_t ga = {};
        const int64_t* cols = out_col.data() + iw * k;
#pragma GCC unroll 7
        for (int64_t kh = 0; kh < k; ++kh) {
          if (g_rows[kh] == nullptr) continue;
#pragma GCC unroll 7
          for (int64_t kw = 0; kw < k; ++kw) {
            if (cols[kw] < 0) continue;
            const vec_t gv = load_vector<acc_t, VB>(g_rows[kh] + cols[kw] * C + c0);
            ga += gv * tap[kh * k + kw];
            sum[kh * k + kw] += gv * av;
          }
        }
        if (gx_row) store_vector<scalar_t, acc_t, VB>(gx_row + iw * C + c0, act_in_backward<acc_t>(ga, xv, act_kind));
      }
      if (a.grad_taps) {
        for (int64_t t = 0; t < k * k; ++t) {
          acc_t* grad_tap = a.grad_taps + t * C + c0;
          store_vector<acc_t, acc_t, VB>(grad_tap, load_vector<acc_t, VB>(grad_tap) + sum[t]);
        }
      }
    }
    for (; c0 < C; ++c0) {
      acc_t sum[kTaps] = {};
      for (int64_t iw = 0; iw < W; ++iw) {
        const acc_t xv = elem_cast<acc_t>(x_row[iw * C + c0]);
        const acc_t av = act(xv);
        acc_t ga = 0;
        for (int64_t kh = 0; kh < k; ++kh) {
          if (g_rows[kh] == nullptr) continue;
          for (int64_t kw = 0; kw < k; ++kw) {
            const int64_t o = out_col[iw * k + kw];
            if (o < 0) continue;
            const acc_t gv = elem_cast<acc_t>(g_rows[kh][o * C + c0]);
            ga += gv * taps[(kh * k + kw) * C + c0];
            sum[kh * k + kw] += gv * av;
          }
        }
        if (gx_row) gx_row[iw * C + c0] = elem_cast<scalar_t>(act_in_backward_scalar<acc_t>(ga, xv, act_kind));
      }
      if (a.grad_taps) {
        for (int64_t t = 0; t < k * k; ++t) a.grad_taps[t * C + c0] += sum[t];
      }
    }
  }
}

#define XF_FOR_EACH_DTYPE(X) X(float, float) X(double, double) X(c10::BFloat16, float) X(c10::Half, float)

#define XF_DEPTHWISE_BACKWARD_ROWS(scalar_t, acc_t)                                                       \
  void depthwise_backward_rows(const DepthwiseBackwardArgs<scalar_t, acc_t>& a, int64_t r_begin, int64_t r_end) { \
    for_this_cpu([&](auto vb) __attribute__((always_inline)) {                                                \
      constexpr int VB = decltype(vb)::value;                                                                 \
      if (a.k == 3) return depthwise_backward_rows_impl<VB, scalar_t, acc_t, 3>(a, r_begin, r_end);           \
      if (a.k == 5) return depthwise_backward_rows_impl<VB, scalar_t, acc_t, 5>(a, r_begin, r_end);           \
      depthwise_backward_rows_impl<VB, scalar_t, acc_t, 0>(a, r_begin, r_end);                                \
    });                                                                                                       \
  }
XF_FOR_EACH_DTYPE(XF_DEPTHWISE_BACKWARD_ROWS)
#undef XF_DEPTHWISE_BACKWARD_ROWS

// ----------------------------------------------------------------------------------------------
// Epilogue: out = act_out(sums + bias) + residual, in fp32, on the block of sums that the product
// has just stored (still in the core's cache), rounded once to the output's dtype. fp32 output:
// the sums are the output's block itself (in place).

template <int VB, typename out_t>
inline __attribute__((always_inline)) void epilogue_impl(const float* sums, int64_t ld_sums, out_t* out,
                                                         int64_t ld_out, int64_t rows, int64_t cols,
                                                         const float* bias, Act act_out, const out_t* residual) {
  using vec_t = vec_of<float, VB>;
  constexpr int64_t lanes = kLanes<float, VB>;
  const Activation<float> act(act_out);
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = sums + r * ld_sums;
    out_t* o = out + r * ld_out;
    const out_t* res = residual ? residual + r * ld_out : nullptr;
    int64_t j = 0;
    for (; j + lanes <= cols; j += lanes) {
      vec_t v = act(load_vector<float, VB>(in + j) + load_vector<float, VB>(bias + j));
      if (res) v += load_vector<float, VB>(res + j);
      store_vector<out_t, float, VB>(o + j, v);
    }
    for (; j < cols; ++j) {
      const float v = act(in[j] + bias[j]);
      o[j] = elem_cast<out_t>(res ? v + elem_cast<float>(res[j]) : v);
    }
  }
}

template <typename out_t>
void epilogue(const float* sums, int64_t ld_sums, out_t* out, int64_t ld_out, int64_t rows, int64_t cols,
              const float* bias, Act act_out, const out_t* residual) {
  for_this_cpu([&](auto vb) __attribute__((always_inline)) {
    epilogue_impl<decltype(vb)::value>(sums, ld_sums, out, ld_out, rows, cols, bias, act_out, residual);
  });
}

// ----------------------------------------------------------------------------------------------
// Max-pool and residual add: out = max_pool2d(x, k, stride, padding) + residual in one pass over x,
// where eager writes the pool's output (and, on a CPU, int64 indices beside it) and reads it back
// for the add. A window's maximum is taken as ATen's max-pool takes it: taps in row order, a tap
// replacing the maximum where it is greater or NaN, so that NaN and the sign of a zero come out as
// eager's; the sum is rounded once, as eager's add rounds it.

struct PoolArgs {
  int64_t N, C, H, W, Ho, Wo, k, stride, padding;
  // The window's rows [begin, end) in x for output row o (the same along columns).
  int64_t begin(int64_t o) const { return std::max<int64_t>(o * stride - padding, 0); }
  int64_t end(int64_t o, int64_t size) const { return std::min<int64_t>(o * stride - padding + k, size); }
};

template <typename acc_t>
inline acc_t max_of(acc_t m, acc_t v) {
  return (v > m || v != v) ? v : m;
}

// max_of on vectors. GCC compiles a select on vectors of 32 or 64 bytes here lane by lane (their
// comparisons are lowered before the AVX2 and AVX-512 instructions are known), so those builds
// spell it in instructions: max, which keeps m where v is not greater (or either is NaN), then v
// where v is NaN.
template <typename acc_t, typename V>
inline __attribute__((always_inline)) V max_step(V m, V v) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (sizeof(V) == 64) {
    if constexpr (std::is_same_v<acc_t, float>) {
      asm("vmaxps %[m], %[v], %[m]\n\tvcmpunordps %[v], %[v], %%k1\n\tvmovaps %[v], %[m]%{%%k1%}"
          : [m] "+v"(m)
          : [v] "v"(v)
          : "k1");
    } else {
      asm("vmaxpd %[m], %[v], %[m]\n\tvcmpunordpd %[v], %[v], %%k1\n\tvmovapd %[v], %[m]%{%%k1%}"
          : [m] "+v"(m)
          : [v] "v"(v)
          : "k1");
    }
    return m;
  } else if constexpr (sizeof(V) == 32) {
    V nan;
    // vblendv has no EVEX form: "x", the registers it can name.
    if constexpr (std::is_same_v<acc_t, float>) {
      asm("vmaxps %[m], %[v], %[m]\n\tvcmpunordps %[v], %[v], %[nan]\n\tvblendvps %[nan], %[v], %[m], %[m]"
          : [m] "+x"(m), [nan] "=&x"(nan)
          : [v] "x"(v));
    } else {
      asm("vmaxpd %[m], %[v], %[m]\n\tvcmpunordpd %[v], %[v], %[nan]\n\tvblendvpd %[nan], %[v], %[m], %[m]"
          : [m] "+x"(m), [nan] "=&x"(nan)
          : [v] "x"(v));
    }
    return m;
  }
#endif
  m = v > m ? v : m;
  return v != v ? v : m;
}

// NHWC: output rows [r_begin, r_end) (flat n * Ho + oh), a vector of channels at a time.
template <int VB, typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void max_pool_add_nhwc_impl(const PoolArgs& a, const scalar_t* x,
                                                                  const scalar_t* residual, scalar_t* out,
                                                                  int64_t r_begin, int64_t r_end) {
  using V = vec_of<acc_t, VB>;
  constexpr int64_t L = kLanes<acc_t, VB>;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  for (int64_t row = r_begin; row < r_end; ++row) {
    const int64_t n = row / a.Ho, oh = row % a.Ho;
    const int64_t h0 = a.begin(oh), h1 = a.end(oh, a.H);
    for (int64_t ow = 0; ow < a.Wo; ++ow) {
      const int64_t w0 = a.begin(ow), w1 = a.end(ow, a.W);
      const int64_t o = (row * a.Wo + ow) * a.C;
      int64_t c = 0;
      for (; c + L <= a.C; c += L) {
        V m = V{} + lowest;
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            const V v = load_vector<acc_t, VB>(x + ((n * a.H + h) * a.W + w) * a.C + c);
            m = max_step<acc_t>(m, v);
          }
        }
        store_vector<scalar_t, acc_t, VB>(out + o + c, m + load_vector<acc_t, VB>(residual + o + c));
      }
      for (; c < a.C; ++c) {
        acc_t m = lowest;
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            m = max_of(m, elem_cast<acc_t>(x[((n * a.H + h) * a.W + w) * a.C + c]));
          }
        }
        out[o + c] = elem_cast<scalar_t>(m + elem_cast<acc_t>(residual[o + c]));
      }
    }
  }
}

#define XF_MAX_POOL_ADD_NHWC(scalar_t, acc_t)                                                                  \
  void max_pool_add_nhwc(const PoolArgs& a, const scalar_t* x, const scalar_t* residual, scalar_t* out,      \
                         int64_t r_begin, int64_t r_end) {                                                   \
    for_this_cpu([&](auto vb) __attribute__((always_inline)) {                                               \
      max_pool_add_nhwc_impl<decltype(vb)::value, scalar_t, acc_t>(a, x, residual, out, r_begin, r_end);     \
    });                                                                                                      \
  }
XF_MAX_POOL_ADD_NHWC(float, float)
XF_MAX_POOL_ADD_NHWC(double, double)
XF_MAX_POOL_ADD_NHWC(c10::BFloat16, float)
XF_MAX_POOL_ADD_NHWC(c10::Half, float)
#undef XF_MAX_POOL_ADD_NHWC

// NCHW: planes [p_begin, p_end) (flat n * C + c), a pixel at a time.
template <typename scalar_t, typename acc_t>
void max_pool_add_nchw(const PoolArgs& a, const scalar_t* x, const scalar_t* residual, scalar_t* out,
                       int64_t p_begin, int64_t p_end) {
  for (int64_t plane = p_begin; plane < p_end; ++plane) {
    const scalar_t* src = x + plane * a.H * a.W;
    for (int64_t oh = 0; oh < a.Ho; ++oh) {
      const int64_t h0 = a.begin(oh), h1 = a.end(oh, a.H);
      for (int64_t ow = 0; ow < a.Wo; ++ow) {
        const int64_t w0 = a.begin(ow), w1 = a.end(ow, a.W);
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) m = max_of(m, elem_cast<acc_t>(src[h * a.W + w]));
        }
        const int64_t o = (plane * a.Ho + oh) * a.Wo + ow;
        out[o] = elem_cast<scalar_t>(m + elem_cast<acc_t>(residual[o]));
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Packed weights

enum Strategy : int64_t { kTiled = 0, kMaterialized = 1 };

// Header fields past the shared ones (sepconv.h).
enum CpuHeaderField : int64_t {
  kBlockWidth = kHeaderLength,  // tiled: output channels per product block
  kDepth,                       // tiled: K, the product's depth (C, rounded up to the VNNI pairs)
  kSumDepth,                    // tiled: K per chunk of the blocked sum (see run_tiled)
  kTapPairs,                    // the channels per pair of vectors the taps are ordered by, or 0
  kCpuHeaderLength
};
// [header, taps [k*k][C], dw_bias [C], pointwise (strategy's layout), pw_bias [Cout or blocks],
//  pw_bias in x's dtype [Cout] (materialized: for the products that take the bias in their input's
//  dtype, oneDNN's with a residual and ATen's; tiled: pw_bias again)]
constexpr int64_t kCpuPackedLength = 6;

// bfloat16 x: the depthwise loops read two vectors of channels at a time, the even channels of
// each pair of vectors first (widen_bf16_pairs), and the taps and bias are packed in that order
// for this CPU's vectors: 2 x its float lanes channels per pair. 0 (channel order) otherwise.
int64_t tap_pairs_for(at::ScalarType x_dtype) {
  return x_dtype == at::kBFloat16 ? 2 * vector_bytes() / static_cast<int64_t>(sizeof(float)) : 0;
}

// Within each whole pair of `pair` channels of the last dimension, the even channels first, then
// the odd ones; the channels past the last whole pair stay in order.
at::Tensor in_pairs_order(const at::Tensor& t, int64_t pair) {
  const int64_t C = t.size(-1), paired = pair > 0 ? C / pair * pair : 0;
  if (paired == 0) return t;
  auto out = t.clone();
  auto head = t.narrow(-1, 0, paired);
  auto sizes = head.sizes().vec();
  sizes.back() = paired / pair;
  sizes.push_back(pair / 2);
  sizes.push_back(2);
  out.narrow(-1, 0, paired).copy_(head.reshape(sizes).transpose(-1, -2).reshape(head.sizes()));
  return out;
}

#ifdef CPUBLAS_BRGEMM_F32F32F32
constexpr bool kHasBrgemm = true;
#else
constexpr bool kHasBrgemm = false;
#endif

// Whether fp32 convolutions may multiply in bf16, as PyTorch's own oneDNN convolutions follow it.
bool fp32_convs_may_use_bf16() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::CONV) ==
         at::Float32Precision::BF16;
#else
  return false;
#endif
}

// The dtype in which the pointwise product of x of `dtype` multiplies, as eager's convolution would.
at::ScalarType product_dtype_for(at::ScalarType dtype) {
  if (dtype == at::kFloat && fp32_convs_may_use_bf16()) return at::kBFloat16;
  return dtype;
}

// Whether the CPU multiplies half-precision `dtype` in instructions of its own, which oneDNN's
// kernels use: bfloat16 pairs' dot products (AVX512-BF16; every CPU with AMX has it too), float16
// arithmetic (AVX512-FP16, likewise). Without them oneDNN's convolution widens each operand to fp32
// and multiplies in fp32 (bf16 on AVX-512), or ATen's convolution does the same element by element.
bool cpu_multiplies_in(at::ScalarType dtype) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool bf16 = kCpuHasAvx512Bf16, fp16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512fp16") != 0;
  }();
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kHalf ? fp16 : false;
#else
  return true;
#endif
}

// The strategy for a unit (see the top of the file).
//
// fp32: tiled. Its blocked sums (run_tiled) keep each unit's rounding error well under eager's,
// where the materialized product is eager's own convolution and adds the BatchNorm fold's
// rounding to eager's error: summed over a deep network that comes out past twice eager's, the
// exactness rule's bound. The materialized product's one large oneDNN GEMM runs a little faster
// on the units whose arithmetic dwarfs their memory traffic (README, CPU kernel, gives the
// measurements), not by enough to trade exactness for.
// Half precision (bf16, fp16) on a CPU that multiplies in it, and fp32 under the bf16 precision
// setting: materialized. The output's rounding dwarfs the sums' order, the intermediate has half
// the bytes, and oneDNN's convolution converts its fp32 accumulators inside its kernel, where
// brgemm's come out in fp32 to be converted per block: a tiled bf16 product (AMX brgemm,
// VNNI-packed weights) measured slower than the materialized one on nearly every unit (README,
// CPU kernel).
// Half precision on a CPU without those instructions: tiled, in fp32 on the depthwise result
// rounded to x's dtype and the weight rounded to it, widened. A product of two half-precision
// values is exact in fp32, so that is the arithmetic of a half-precision product with fp32 sums,
// the one eager's convolution runs there too, less the intermediate's round trip through memory.
Strategy choose_strategy(at::ScalarType x_dtype, at::ScalarType product_dtype) {
  if (!kHasBrgemm || x_dtype == at::kDouble) return kMaterialized;
  if (product_dtype == at::kFloat) return kTiled;
  return product_dtype == x_dtype && !cpu_multiplies_in(x_dtype) ? kTiled : kMaterialized;
}

Strategy parse_strategy(c10::string_view name, at::ScalarType x_dtype, at::ScalarType product_dtype) {
  if (name == "auto") return choose_strategy(x_dtype, product_dtype);
  if (name == "tiled") {
    TORCH_CHECK_VALUE(kHasBrgemm && x_dtype != at::kDouble && product_dtype == x_dtype,
                      "pack_cpu: strategy 'tiled' multiplies in fp32 with cpublas::brgemm: it needs a torch built "
                      "with oneDNN and float32 x (without the bf16 precision setting), bfloat16 x or float16 x, got ",
                      x_dtype, " x multiplied in ", product_dtype);
    return kTiled;
  }
  TORCH_CHECK_VALUE(name == "materialized", "pack_cpu: strategy must be 'auto', 'tiled' or 'materialized', got '",
                    std::string(name), "'");
  return kMaterialized;
}

// The chunk of K whose fp32 partial sums the tiled product adds up (run_tiled).
constexpr int64_t kFp32SumDepth = 256;

int64_t block_width_for(int64_t Cout) {
  // brgemm's block of output channels: four of the CPU's vectors (64 floats with AVX-512's 32
  // registers, 32 with AVX2's 16), so that a row of the block's accumulators leaves registers for
  // several rows. Measured on the deep products (Xception's exit flow, README): AVX2's brgemm runs
  // a block of 64 floats markedly slower than one of 32, AVX-512's one of 32 slower than one of 64.
  // Narrower (a whole number of vectors) for units with fewer output channels, so that little of
  // the block is padding.
  const int64_t lanes = vector_bytes() / static_cast<int64_t>(sizeof(float));
  return std::min<int64_t>(4 * lanes, (Cout + lanes - 1) / lanes * lanes);
}

// Whether the materialized product runs as oneDNN's pointwise convolution with the prepacked weights
// and post-ops: for half-precision x, where the output's rounding dwarfs the order of the fp32
// sums. fp32 and fp64 x take ATen's convolution, eager's own, whose sums (its algorithm is chosen
// per shape) the exactness rule compares with.
// oneDNN's bf16 convolution needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: on other x86 CPUs (AVX2
// ones) its ops refuse bf16, and a bf16 unit multiplies in ATen's convolution, as eager's does there.
bool materialized_in_onednn(at::ScalarType dtype) {
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn() || dtype != at::kBFloat16) return false;
  static const bool has_bf16 = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("mkldnn::_is_mkldnn_bf16_supported", "")
                                   .typed<bool()>()
                                   .call();
  return has_bf16;
}

// The oneDNN-prepacked weight (what torch.compile's CPU backend emits), or the plain weight where
// oneDNN is not available.
// oneDNN picks its convolution's weight layout per problem shape: weights reordered for another
// input size are reordered again on every call (by oneDNN's reference reorder where the layouts
// are blocked differently, at many times the convolution's own cost). So the reorder takes the
// input size the weights are packed for, and without one the weights stay plain (oneDNN then
// reorders them per call, with its fast reorders).
at::Tensor reorder_for_onednn(const at::Tensor& w, at::IntArrayRef input_size) {
  static const auto reorder = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("mkldnn::_reorder_convolution_weight", "")
                                  .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                                    c10::SymIntArrayRef, c10::SymInt, at::OptionalSymIntArrayRef)>();
  const std::vector<c10::SymInt> zeros{0, 0}, ones{1, 1};
  const std::vector<c10::SymInt> size(input_size.begin(), input_size.end());
  return reorder.call(w, zeros, ones, ones, 1, c10::SymIntArrayRef(size));
}

// [block][C][block width]: each block of output channels a row-major K x N matrix, zero past
// Cout, as brgemm reads B. One pass over the [Cout][C] weight, in squares of kSquare x block that
// stay in L1 while each is transposed: a plain strided transpose of a weight of several MB misses
// the cache on nearly every read, and the op packs on every call that is not given packed weights.
at::Tensor pointwise_blocks(const at::Tensor& w, int64_t block) {
  constexpr int64_t kSquare = 64;
  const int64_t Cout = w.size(0), C = w.size(1), blocks = (Cout + block - 1) / block;
  auto packed = at::empty({blocks, C * block}, w.options());
  const float* src = w.const_data_ptr<float>();
  float* dst = packed.mutable_data_ptr<float>();
  const int64_t squares = (C + kSquare - 1) / kSquare;
  at::parallel_for(0, blocks * squares, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / squares, k0 = item % squares * kSquare, k1 = std::min(C, k0 + kSquare);
      const int64_t cols = std::min(block, Cout - b * block);
      float* out = dst + b * C * block;
      for (int64_t k = k0; k < k1; ++k) {
        const float* column = src + b * block * C + k;
        for (int64_t j = 0; j < cols; ++j) out[k * block + j] = column[j * C];
        for (int64_t j = cols; j < block; ++j) out[k * block + j] = 0.0f;
      }
    }
  });
  return packed;
}

std::vector<at::Tensor> pack_cpu_impl(const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                                      const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias,
                                      at::ScalarType x_dtype, c10::string_view strategy_name,
                                      at::OptionalIntArrayRef input_size) {
  TORCH_CHECK_VALUE(dw_weight.dim() == 4 && dw_weight.size(1) == 1 && dw_weight.size(2) == dw_weight.size(3),
                    "pack_cpu: dw_weight must be a depthwise kernel of shape [C, 1, k, k], got ", dw_weight.sizes());
  TORCH_CHECK_VALUE(pw_weight.dim() == 4 && pw_weight.size(1) == dw_weight.size(0) && pw_weight.size(2) == 1 &&
                        pw_weight.size(3) == 1,
                    "pack_cpu: pw_weight must be a pointwise kernel of shape [Cout, C, 1, 1] with C = ",
                    dw_weight.size(0), ", got ", pw_weight.sizes());
  TORCH_CHECK_VALUE(x_dtype == at::kFloat || x_dtype == at::kBFloat16 || x_dtype == at::kHalf ||
                        x_dtype == at::kDouble,
                    "pack_cpu: dtype must be float32, bfloat16, float16 or float64, got ", x_dtype);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::NoGradGuard no_grad;
  const int64_t C = dw_weight.size(0), k = dw_weight.size(2), Cout = pw_weight.size(0);
  const auto acc_dtype = x_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto product_dtype = product_dtype_for(x_dtype);
  const Strategy strategy = parse_strategy(strategy_name, x_dtype, product_dtype);
  const auto opts = dw_weight.options().dtype(acc_dtype);

  auto header = at::zeros({kCpuHeaderLength}, at::dtype(at::kLong));
  auto* h = header.mutable_data_ptr<int64_t>();
  h[kFormat] = kCpuFormat;
  h[kChannels] = C;
  h[kOutChannels] = Cout;
  h[kKernelSize] = k;
  h[kProductDtype] = static_cast<int64_t>(product_dtype);
  h[kLayout] = strategy;
  h[kTapPairs] = tap_pairs_for(x_dtype);

  const auto taps =
      in_pairs_order(dw_weight.detach().reshape({C, k * k}).t().to(acc_dtype).contiguous(), h[kTapPairs]);
  const auto dw_b = in_pairs_order(
      dw_bias.has_value() ? dw_bias->detach().to(acc_dtype).contiguous() : at::zeros({C}, opts), h[kTapPairs]);
  const auto w = pw_weight.detach().reshape({Cout, C});
  at::Tensor pointwise, pw_b;
  if (strategy == kTiled) {
    const int64_t block = block_width_for(Cout);
    const int64_t blocks = (Cout + block - 1) / block;
    h[kBlockWidth] = block;
    h[kDepth] = C;
    h[kSumDepth] = kFp32SumDepth;
    // Half-precision x: the weight rounded to x's dtype, as eager's convolution takes it, and its
    // input channels in the order of the depthwise rows' bfloat16 pairs (depthwise_rows_impl).
    const auto rounded = x_dtype == at::kFloat ? w : w.to(x_dtype);
    pointwise = pointwise_blocks(in_pairs_order(rounded.to(at::kFloat).contiguous(), h[kTapPairs]), block);
    pw_b = at::zeros({blocks * block}, opts.dtype(at::kFloat));
    if (pw_bias.has_value()) pw_b.narrow(0, 0, Cout).copy_(*pw_bias);
  } else {
    const auto wd = x_dtype == at::kDouble ? w.to(at::kDouble) : w.to(x_dtype);
    const auto w4 = wd.reshape({Cout, C, 1, 1}).contiguous();
    // The depthwise result's size, the convolution's input.
    pointwise = materialized_in_onednn(x_dtype) && input_size.has_value() ? reorder_for_onednn(w4, *input_size) : w4;
    pw_b = pw_bias.has_value() ? pw_bias->detach().to(acc_dtype).contiguous() : at::zeros({Cout}, opts);
  }
  return {header, taps, dw_b, pointwise, pw_b, strategy == kTiled ? pw_b : pw_b.to(x_dtype)};
}

// ----------------------------------------------------------------------------------------------
// The strategies

struct Operands {
  UnitShape s;
  at::Tensor x, residual;  // NHWC (channels-last)
  at::Tensor out;  // channels-last, allocated by the strategy that computes it
  at::Tensor taps, dw_bias, pointwise, pw_bias, pw_bias_in_x_dtype;
  std::vector<int64_t> header;
  // The depthwise result, channels-last in x's dtype, for a backward that would otherwise
  // recompute it: defined (allocated by the tiled strategy, its own intermediate by the
  // materialized one) only when the caller keeps it.
  bool keep_depthwise = false;
  at::Tensor depthwise;
};

template <typename scalar_t, typename dst_t, typename acc_t>
DepthwiseArgs<scalar_t, acc_t> depthwise_args(const Operands& o) {
  const auto& s = o.s;
  return DepthwiseArgs<scalar_t, acc_t>{
      o.x.const_data_ptr<scalar_t>(), o.taps.const_data_ptr<acc_t>(), o.dw_bias.const_data_ptr<acc_t>(),
      s.N, s.C, s.H, s.W, s.Ho, s.Wo, s.k, s.stride, s.padding, s.dilation,
      Activation<acc_t>(s.act_in), Activation<acc_t>(s.act_mid)};
}

// Tiles of output pixels x groups of output-channel blocks. A tile's depthwise rows take half of
// a core's L2, the other half left to the weights streaming past them: the larger the tile, the
// fewer times the whole weight streams in from L3 (once per tile), which is what a unit with a
// large weight (Xception's exit flow) loses to eager's convolution at large batches. Where that
// makes too few tiles for every thread to have several (batch 1, small maps), the tiles shrink
// first (down to kMinTileRows), and only then do the output channels split into groups, each of
// which computes the tile's depthwise rows again. The tile count is a multiple of the thread
// count and the tiles' rows differ by one at most, so that every thread gets the same number of
// rows: the threads take equal runs of tiles, and a thread with one tile more than the others, of
// a unit whose product dwarfs the rest, makes the whole unit that much slower.
struct TilePlan {
  int64_t M, tiles, groups, blocks_per_group;
  int64_t first_row(int64_t tile) const { return M * tile / tiles; }
  int64_t max_rows() const { return (M + tiles - 1) / tiles; }
};

constexpr int64_t kMinTileRows = 32;

int64_t l2_bytes_per_core() {
  int64_t bytes = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
  bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  // Where the platform does not say, the smallest L2 of current x86 server cores.
  return bytes > 0 ? bytes : int64_t{512} << 10;
}

// The last-level cache, as Linux's sysfs describes cpu0's caches (the highest level's size), or 0
// where it does not say. Not sysconf's L3 size: on a VM glibc derives it from what CPUID reports,
// which need not be the cache the guest has (ten times it on the AMD EPYC VM here).
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t level = 0, size = 0;
    for (int index = 0;; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size");
      int64_t this_level = 0, kib = 0;
      std::string unit;
      if (!(level_file >> this_level) || !(size_file >> kib >> unit)) break;
      if (this_level >= level) {
        level = this_level;
        size = kib << (unit == "K" ? 10 : unit == "M" ? 20 : 0);
      }
    }
    return size;
  }();
  return bytes;
}

TilePlan plan_tiles(int64_t M, int64_t depth, int64_t operand_size, int64_t blocks) {
  static const int64_t budget = l2_bytes_per_core() / 2;
  const int64_t threads = at::get_num_threads(), wanted = 4 * threads;
  const int64_t rows_in_budget = std::clamp<int64_t>(budget / (depth * operand_size), kMinTileRows, 256);
  int64_t tiles = std::max((M + rows_in_budget - 1) / rows_in_budget, std::min(wanted, M / kMinTileRows));
  if (tiles >= threads) tiles = (tiles + threads - 1) / threads * threads;
  TilePlan p;
  p.M = M;
  p.tiles = std::clamp<int64_t>(tiles, 1, M);
  p.groups = std::min(blocks, std::max<int64_t>(1, (wanted + p.tiles - 1) / p.tiles));
  p.blocks_per_group = (blocks + p.groups - 1) / p.groups;
  p.groups = (blocks + p.blocks_per_group - 1) / p.blocks_per_group;
  return p;
}

// A tile's depthwise rows, [rows][C] in fp32 (their bfloat16 pairs' order, pair channels a pair,
// for bfloat16 x), into the kept depthwise result's rows in x's dtype and channel order: the values
// are x's dtype's already (RoundedFloat), so the conversion is exact.
template <typename scalar_t>
void store_kept_rows(const float* rows_src, int64_t rows, int64_t C, int64_t pair, scalar_t* kept) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy_n(rows_src, rows * C, kept);
  } else {
    const int64_t paired = pair > 0 ? C / pair * pair : 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t j = c % std::max<int64_t>(pair, 1);
        const int64_t from = c < paired ? c - j + j % 2 * (pair / 2) + j / 2 : c;
        kept[r * C + c] = static_cast<scalar_t>(rows_src[r * C + from]);
      }
    }
  }
}

// fp32 x: the tiles' depthwise rows and the product's sums are fp32, and each block of the output
// is its own sums. Half-precision x (choose_strategy): the rows rounded to x's dtype, kept widened,
// multiplied in fp32 by the rounded weight; the sums go to a block of the thread's own, which the
// epilogue rounds into the output.
template <typename scalar_t>
void run_tiled(Operands& o) {
  constexpr bool kFloatOut = std::is_same_v<scalar_t, float>;
  using row_t = std::conditional_t<kFloatOut, float, RoundedFloat<scalar_t>>;
  const auto& s = o.s;
  const int64_t M = s.N * s.Ho * s.Wo;
  const int64_t block = o.header[kBlockWidth], depth = o.header[kDepth], sum_depth = o.header[kSumDepth];
  const int64_t blocks = (s.Cout + block - 1) / block;
  const TilePlan plan = plan_tiles(M, depth, sizeof(float), blocks);
  const auto dw = depthwise_args<scalar_t, row_t, float>(o);
  const InAct in_act = in_act_kind(s.act_in);
  const float* pointwise = o.pointwise.const_data_ptr<float>();
  const float* bias = o.pw_bias.const_data_ptr<float>();
  const scalar_t* residual = o.residual.defined() ? o.residual.const_data_ptr<scalar_t>() : nullptr;
  o.out = nhwc_output(o.x, s);
  scalar_t* out = o.out.mutable_data_ptr<scalar_t>();
  scalar_t* kept = nullptr;
  if (o.keep_depthwise) {
    TORCH_INTERNAL_ASSERT(depth == s.C, "the tiles' depthwise rows are [rows][C]");
    o.depthwise = at::empty({s.N, s.C, s.Ho, s.Wo}, o.x.options().memory_format(at::MemoryFormat::ChannelsLast));
    kept = o.depthwise.mutable_data_ptr<scalar_t>();
  }

  at::parallel_for(0, plan.tiles * plan.groups, 1, [&](int64_t item_begin, int64_t item_end) {
    std::vector<float> a(static_cast<size_t>(plan.max_rows() * depth));
    std::vector<float> sums(kFloatOut ? 0 : static_cast<size_t>(plan.max_rows() * block));
    int64_t rows_of = -1;  // the tile whose depthwise rows `a` holds
    for (int64_t item = item_begin; item < item_end; ++item) {
      const int64_t tile = item / plan.groups, group = item % plan.groups;
      const int64_t p0 = plan.first_row(tile), rows = plan.first_row(tile + 1) - p0;
      if (tile != rows_of) {
        depthwise_rows(dw, in_act, p0, p0 + rows, reinterpret_cast<row_t*>(a.data()), depth);
        rows_of = tile;
      }
      // The tile's rows are the kept result's rows p0.. (both [pixel][C]): one copy per tile, by
      // the thread that takes its first group of output channels.
      if (kept != nullptr && group == 0) store_kept_rows(a.data(), rows, depth, o.header[kTapPairs], kept + p0 * depth);
      const int64_t b_end = std::min(blocks, (group + 1) * plan.blocks_per_group);
      for (int64_t b = group * plan.blocks_per_group; b < b_end; ++b) {
        const int64_t co0 = b * block, cols = std::min(block, s.Cout - co0);
        const float* w = pointwise + b * depth * block;
        scalar_t* dst = out + p0 * s.Cout + co0;
        float* c = kFloatOut ? reinterpret_cast<float*>(dst) : sums.data();
        const int64_t ldc = kFloatOut ? s.Cout : block;
        // The product over K in chunks of sum_depth, each chunk's sums added to the tile's:
        // rounding error then grows with sum_depth + K / sum_depth rather than with K (brgemm's,
        // and oneDNN's convolution's, running sum over K). brgemm with add_C sums a chunk in its
        // registers from zero and adds C to it at the store (oneDNN's beta = 1), which is that
        // blocked sum with no buffer of partial sums. For fp32 C is the output itself, so the
        // epilogue then finds the block in cache and the output is written from the product's stores.
        at::native::cpublas::brgemm(rows, cols, std::min(sum_depth, depth), depth, block, ldc, false, a.data(), w, c);
        for (int64_t k0 = sum_depth; k0 < depth; k0 += sum_depth) {
          at::native::cpublas::brgemm(rows, cols, std::min(sum_depth, depth - k0), depth, block, ldc, true,
                                      a.data() + k0, w + k0 * block, c);
        }
        epilogue(c, ldc, dst, s.Cout, rows, cols, bias + co0, s.act_out,
                 residual ? residual + p0 * s.Cout + co0 : nullptr);
      }
    }
  });
}

// mkldnn::_convolution_pointwise and its .binary overload, through the dispatcher: oneDNN is
// linked into libtorch with its symbols hidden.
// The bias goes in as float32, added before the one rounding of the result, except with a residual:
// the binary overload takes it only in d's dtype (bias_in_d_dtype).
at::Tensor onednn_pointwise(const at::Tensor& d, const at::Tensor& w, const at::Tensor& bias,
                            const at::Tensor& bias_in_d_dtype, Act act, const at::Tensor& residual) {
  static const auto unary =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  static const auto binary =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                            std::optional<at::Scalar>, std::optional<c10::string_view>,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  const std::vector<int64_t> zeros{0, 0}, ones{1, 1};
  if (residual.defined()) {
    return binary.call(d, residual, w, bias_in_d_dtype, zeros, ones, ones, 1, "add", std::nullopt,
                       std::nullopt, c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  c10::List<std::optional<at::Scalar>> scalars;
  const char* attr = "none";
  if (act == Act::kRelu) attr = "relu";
  if (act == Act::kHardswish) attr = "hardswish";
  if (act == Act::kRelu6) {
    attr = "hardtanh";
    scalars.push_back(at::Scalar(0.0));
    scalars.push_back(at::Scalar(6.0));
  }
  return unary.call(d, w, bias, zeros, ones, ones, 1, attr, scalars, std::nullopt);
}

// The materialized product's depthwise result where the caller does not keep it: one buffer for the
// process, kept from call to call at the largest size it has held, lent to one call at a time (a
// call that finds it lent makes its own). glibc's allocator maps a block of megabytes afresh on many
// calls (it returns large freed blocks to the system), and the first write to each of its 4 KB pages
// then faults, at a cost comparable to the depthwise pass's own: made fresh on every call, the unit
// ran slower than eager's in a process with that allocator (README, CPU kernel).
class DepthwiseScratch {
 public:
  DepthwiseScratch() = default;
  ~DepthwiseScratch() {
    if (leased_) lent().store(false, std::memory_order_release);
  }
  DepthwiseScratch(const DepthwiseScratch&) = delete;
  DepthwiseScratch& operator=(const DepthwiseScratch&) = delete;

  // Channels-last [N, C, Ho, Wo] in `options`' dtype, valid while this object lives: the buffer is
  // lent from the first call to the object's end.
  at::Tensor tensor(const UnitShape& s, const at::TensorOptions& options) {
    const std::vector<int64_t> sizes{s.N, s.C, s.Ho, s.Wo};
    if (!leased_) leased_ = !lent().exchange(true, std::memory_order_acquire);
    if (!leased_) return at::empty(sizes, options.memory_format(at::MemoryFormat::ChannelsLast));
    const int64_t needed = s.N * s.C * s.Ho * s.Wo * static_cast<int64_t>(options.dtype().itemsize());
    at::Tensor& bytes = buffer();
    if (!bytes.defined() || bytes.numel() < needed) {
      bytes = at::Tensor();  // the old buffer freed before the new one is made, not beside it
      bytes = at::empty({needed}, options.dtype(at::kByte));
    }
    return at::empty({0}, options).set_(bytes.storage(), 0, sizes, {s.C * s.Ho * s.Wo, 1, s.Wo * s.C, s.C});
  }

 private:
  static std::atomic<bool>& lent() {
    static std::atomic<bool> flag{false};
    return flag;
  }
  static at::Tensor& buffer() {
    static auto* bytes = new at::Tensor();  // never destroyed: no order to keep with libtorch's at exit
    return *bytes;
  }
  bool leased_ = false;
};

template <typename scalar_t>
void run_materialized(Operands& o) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& s = o.s;
  const int64_t M = s.N * s.Ho * s.Wo;
  // The intermediate in x's dtype, as eager's depthwise conv writes it.
  DepthwiseScratch scratch;
  auto d = o.keep_depthwise
               ? at::empty({s.N, s.C, s.Ho, s.Wo}, o.x.options().memory_format(at::MemoryFormat::ChannelsLast))
               : scratch.tensor(s, o.x.options());
  auto dw = depthwise_args<scalar_t, scalar_t, acc_t>(o);
  // Past the caches where the depthwise result and the product's output together exceed the
  // last-level cache: the lines of the result would then leave the cache before the product reads
  // them, so reading each line before it is written (what a cached store does) and keeping it are
  // traffic for nothing, in the depthwise pass, which is bound by memory at those sizes (glibc's
  // memcpy switches to the same stores past a fraction of that cache). Below it the product finds
  // the result in the cache and the cached stores are faster (README, CPU kernel, gives both).
  const int64_t llc = last_level_cache_bytes();
  dw.stream = llc > 0 && (d.nbytes() + M * s.Cout * d.element_size()) > static_cast<size_t>(llc);
  const InAct in_act = in_act_kind(s.act_in);
  scalar_t* d_ptr = d.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) { depthwise_rows(dw, in_act, b, e, d_ptr + b * s.C, s.C); });
  if (o.keep_depthwise) o.depthwise = d;

  at::Tensor y;
  if (materialized_in_onednn(o.x.scalar_type())) {
    // oneDNN applies the activation after its binary post-op: a residual added after a non-identity
    // activation is a pass of its own.
    const bool residual_after_act = o.residual.defined() && s.act_out != Act::kIdentity;
    y = onednn_pointwise(d, o.pointwise, o.pw_bias, o.pw_bias_in_x_dtype, s.act_out,
                         residual_after_act ? at::Tensor() : o.residual);
    if (residual_after_act) y.add_(o.residual);
  } else {
    y = at::conv2d(d, o.pointwise, o.pw_bias_in_x_dtype);
    if (s.act_out == Act::kRelu) y.relu_();
    if (s.act_out == Act::kRelu6) y.clamp_(0, 6);
    if (s.act_out == Act::kHardswish) y = at::hardswish(y);
    if (o.residual.defined()) y.add_(o.residual);
  }
  o.out = y.contiguous(at::MemoryFormat::ChannelsLast);
}

// ----------------------------------------------------------------------------------------------
// The op

// The unit's output in x's memory format, and its depthwise result (channels-last) where
// keep_depthwise asks for it.
std::tuple<at::Tensor, at::Tensor> run_unit(const at::Tensor& x, const at::Tensor& dw_weight,
                                            const std::optional<at::Tensor>& dw_bias, const at::Tensor& pw_weight,
                                            const std::optional<at::Tensor>& pw_bias,
                                            const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding,
                                            int64_t dilation, c10::string_view act_in, c10::string_view act_mid,
                                            c10::string_view act_out, std::optional<at::TensorList> packed,
                                            bool keep_depthwise) {
  const UnitShape s = check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation,
                                 act_in, act_mid, act_out);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "sepconv (CPU kernel): x must be a CPU tensor, got ", x.device());
  // The ATen calls inside compute in the dtypes chosen here, even under autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto [x_nhwc, res_nhwc, memory_format] = nhwc_operands(x, s, residual);
  if (s.N * s.Cout * s.Ho * s.Wo == 0) {
    return {nhwc_output(x, s).contiguous(memory_format),
            keep_depthwise ? at::empty({s.N, s.C, s.Ho, s.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast))
                           : at::Tensor()};
  }

  std::vector<at::Tensor> own;
  const at::TensorList weights = packed_or_packing(packed, own, [&] {
    // Kept, the depthwise result goes to memory anyway, which is what the tiled product saves;
    // and weights that come unpacked (a training step's, new every step) would be laid out for it
    // on every call. The materialized product takes them as they are, in eager's own convolution.
    return pack_cpu_impl(dw_weight, dw_bias, pw_weight, pw_bias, x.scalar_type(),
                         keep_depthwise ? "materialized" : "auto", std::vector<int64_t>{s.N, s.C, s.Ho, s.Wo});
  });
  Operands o{s, x_nhwc, res_nhwc};
  o.keep_depthwise = keep_depthwise;
  o.header = check_packed_header(weights, kCpuFormat, s, product_dtype_for(x.scalar_type()), kCpuPackedLength);
  TORCH_CHECK_VALUE(static_cast<int64_t>(o.header.size()) == kCpuHeaderLength,
                    "sepconv: packed weights have a header of ", o.header.size(), " fields, this version's CPU kernel "
                    "writes ", kCpuHeaderLength, " (packed by another version): pack them again");
  o.taps = weights[1];
  o.dw_bias = weights[2];
  o.pointwise = weights[3];
  o.pw_bias = weights[4];
  o.pw_bias_in_x_dtype = weights[5];
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(o.taps.scalar_type() == acc_dtype && o.taps.numel() == s.k * s.k * s.C &&
                        o.dw_bias.numel() == s.C && o.taps.is_contiguous() && o.dw_bias.is_contiguous(),
                    "sepconv: packed weights do not hold this unit's depthwise taps");
  TORCH_CHECK_VALUE(o.header[kTapPairs] == tap_pairs_for(x.scalar_type()),
                    "sepconv: packed weights were made with their taps in pairs of ", o.header[kTapPairs],
                    " channels, this CPU's kernel reads them in pairs of ", tap_pairs_for(x.scalar_type()),
                    " (made on another CPU or for another dtype): pack them again");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sepconv_cpu", [&] {
    if (o.header[kLayout] == kMaterialized) {
      TORCH_CHECK_VALUE(o.pw_bias.scalar_type() == acc_dtype && o.pw_bias.numel() == s.Cout &&
                            o.pw_bias_in_x_dtype.scalar_type() == x.scalar_type() &&
                            o.pw_bias_in_x_dtype.numel() == s.Cout,
                        "sepconv: packed weights do not hold this unit's pointwise bias");
      run_materialized<scalar_t>(o);
      return;
    }
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK_VALUE(false, "sepconv: packed weights for the tiled product run float32, bfloat16 or float16 x, "
                        "got ", x.scalar_type());
    } else {
      const int64_t blocks = (s.Cout + o.header[kBlockWidth] - 1) / o.header[kBlockWidth];
      TORCH_CHECK_VALUE(o.pointwise.scalar_type() == at::kFloat && o.pointwise.is_contiguous() &&
                            o.pointwise.numel() == blocks * o.header[kDepth] * o.header[kBlockWidth] &&
                            o.pw_bias.numel() == blocks * o.header[kBlockWidth],
                        "sepconv: packed weights do not hold this unit's pointwise blocks");
      run_tiled<scalar_t>(o);
    }
  });
  return {o.out.contiguous(memory_format), o.depthwise};
}

at::Tensor sepconv_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                       const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias,
                       const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, int64_t dilation,
                       c10::string_view act_in, c10::string_view act_mid, c10::string_view act_out,
                       std::optional<at::TensorList> packed) {
  return std::get<0>(run_unit(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in,
                              act_mid, act_out, packed, false));
}

std::tuple<at::Tensor, at::Tensor> sepconv_keeping_depthwise_cpu(
    const at::Tensor& x, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
    const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias, const std::optional<at::Tensor>& residual,
    int64_t stride, int64_t padding, int64_t dilation, c10::string_view act_in, c10::string_view act_mid,
    c10::string_view act_out, std::optional<at::TensorList> packed) {
  return run_unit(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in, act_mid,
                  act_out, packed, true);
}

// The gradients of x and of dw_weight ([C, 1, k, k], fp32 for half-precision x; fp64 for fp64)
// from `grad`, the gradient at the depthwise conv's output, for the depthwise conv of
// act_in(x); output_mask says which (the other is undefined). grad_x has x's memory format.
std::tuple<at::Tensor, at::Tensor> depthwise_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& dw_weight, int64_t stride,
                                                          int64_t padding, int64_t dilation, c10::string_view act_in,
                                                          std::array<bool, 2> output_mask) {
  TORCH_CHECK_VALUE(x.dim() == 4 && dw_weight.dim() == 4 && dw_weight.size(0) == x.size(1) && dw_weight.size(1) == 1 &&
                        dw_weight.size(2) == dw_weight.size(3),
                    "depthwise_backward: dw_weight must be [C, 1, k, k] with C = x's channels, got ", dw_weight.sizes(),
                    " for x of shape ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), k = dw_weight.size(2);
  TORCH_CHECK_VALUE(k <= 7, "depthwise_backward: kernel size must be at most 7, got ", k);
  TORCH_CHECK_VALUE(stride >= 1 && dilation >= 1 && padding >= 0,
                    "depthwise_backward: stride and dilation must be >= 1 and padding >= 0");
  const int64_t Ho = (H + 2 * padding - dilation * (k - 1) - 1) / stride + 1;
  const int64_t Wo = (W + 2 * padding - dilation * (k - 1) - 1) / stride + 1;
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == N && grad.size(1) == C && grad.size(2) == Ho &&
                        grad.size(3) == Wo,
                    "depthwise_backward: grad must have the depthwise output's shape [", N, ", ", C, ", ", Ho, ", ",
                    Wo, "], got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.scalar_type() == x.scalar_type(), "depthwise_backward: grad must have x's dtype");
  TORCH_CHECK_VALUE(x.device().is_cpu() && grad.device().is_cpu() && dw_weight.device().is_cpu(),
                    "depthwise_backward (CPU kernel): tensors must be on the CPU");
  const Act act = parse_activation(act_in, "act_in");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto x_nhwc = x.contiguous(cl), g_nhwc = grad.contiguous(cl);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto taps = dw_weight.detach().reshape({C, k * k}).t().to(acc_dtype).contiguous();
  at::Tensor grad_x, grad_taps;
  if (output_mask[0]) grad_x = at::empty_like(x_nhwc, x_nhwc.options(), cl);
  // Per chunk of input rows, its own sums of the taps' gradient, added up in chunk order at the
  // end: a fixed number of chunks (more where there are more threads), so that the sums' order,
  // and so the result, does not depend on how the threads share them.
  const int64_t rows = N * H, chunks = std::min(rows, std::max<int64_t>(32, at::get_num_threads()));
  at::Tensor partial;
  if (output_mask[1]) partial = at::zeros({chunks, k * k, C}, x.options().dtype(acc_dtype));
  if (rows == 0 || C == 0) {
    grad_taps = output_mask[1] ? at::zeros({k * k, C}, x.options().dtype(acc_dtype)) : at::Tensor();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          DepthwiseBackwardArgs<scalar_t, acc_t> args{
              g_nhwc.const_data_ptr<scalar_t>(), x_nhwc.const_data_ptr<scalar_t>(), taps.const_data_ptr<acc_t>(),
              output_mask[0] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
              output_mask[1] ? partial[chunk].mutable_data_ptr<acc_t>() : nullptr,
              N, C, H, W, Ho, Wo, k, stride, padding, dilation, act};
          depthwise_backward_rows(args, rows * chunk / chunks, rows * (chunk + 1) / chunks);
        }
      });
    });
    if (output_mask[1]) grad_taps = partial.sum(0);
  }
  at::Tensor grad_w;
  if (output_mask[1]) grad_w = grad_taps.t().contiguous().reshape({C, 1, k, k});
  return {output_mask[0] ? grad_x.contiguous(x.suggest_memory_format()) : at::Tensor(), grad_w};
}

// max_pool2d(x, kernel_size, stride, padding) + residual in x's memory format; the checks and their
// messages are those of the Python fake (contract.check_max_pool_add_args).
at::Tensor max_pool_add_cpu(const at::Tensor& x, const at::Tensor& residual, int64_t kernel_size, int64_t stride,
                            int64_t padding) {
  TORCH_CHECK_VALUE(x.dim() == 4, "max_pool_add: x must be a 4-D [N, C, H, W] tensor, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                        x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                    "max_pool_add: x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(kernel_size >= 1, "max_pool_add: kernel_size must be >= 1, got ", kernel_size);
  TORCH_CHECK_VALUE(stride >= 1, "max_pool_add: stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding >= 0 && 2 * padding <= kernel_size,
                    "max_pool_add: padding must be between 0 and half of kernel_size (", kernel_size, "), got ",
                    padding);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(C >= 1 && H >= 1 && W >= 1, "max_pool_add: x needs C, H, W >= 1, got shape ", x.sizes());
  const int64_t Ho = (H + 2 * padding - kernel_size) / stride + 1, Wo = (W + 2 * padding - kernel_size) / stride + 1;
  TORCH_CHECK_VALUE(H + 2 * padding >= kernel_size && W + 2 * padding >= kernel_size,
                    "max_pool_add: x of size ", H, "x", W, " is smaller than the window (", kernel_size,
                    ") with padding ", padding, ": the output would be empty");
  TORCH_CHECK_VALUE(residual.sizes() == at::IntArrayRef({N, C, Ho, Wo}),
                    "max_pool_add: residual must have the pooled shape [", N, ", ", C, ", ", Ho, ", ", Wo, "], got ",
                    residual.sizes());
  TORCH_CHECK_VALUE(residual.scalar_type() == x.scalar_type(), "max_pool_add: residual must have x's dtype (",
                    x.scalar_type(), "), got ", residual.scalar_type());
  TORCH_CHECK_VALUE(residual.device() == x.device(), "max_pool_add: residual is on ", residual.device(),
                    " but x is on ", x.device());
  const auto memory_format = x.suggest_memory_format();
  const bool nhwc = memory_format == at::MemoryFormat::ChannelsLast;
  const auto layout = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto x_in = x.contiguous(layout), r_in = residual.contiguous(layout);
  auto out = at::empty({N, C, Ho, Wo}, x.options().memory_format(layout));
  const PoolArgs args{N, C, H, W, Ho, Wo, kernel_size, stride, padding};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x_in.const_data_ptr<scalar_t>();
    const scalar_t* rp = r_in.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // Whole output rows (NHWC) or planes (NCHW) per thread.
    at::parallel_for(0, nhwc ? N * Ho : N * C, 1, [&](int64_t begin, int64_t end) {
      if (nhwc) {
        max_pool_add_nhwc(args, xp, rp, op, begin, end);
      } else {
        max_pool_add_nchw<scalar_t, acc_t>(args, xp, rp, op, begin, end);
      }
    });
  });
  return out;
}

std::vector<at::Tensor> pack_cpu(const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                                 const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias,
                                 at::ScalarType dtype, c10::string_view strategy,
                                 at::OptionalIntArrayRef output_size) {
  std::optional<std::vector<int64_t>> input_size;
  if (output_size.has_value()) {
    TORCH_CHECK_VALUE(output_size->size() == 4, "pack_cpu: output_size must be [N, Cout, Ho, Wo], got ",
                      *output_size);
    input_size = std::vector<int64_t>{(*output_size)[0], dw_weight.size(0), (*output_size)[2], (*output_size)[3]};
  }
  return pack_cpu_impl(dw_weight, dw_bias, pw_weight, pw_bias, dtype, strategy,
                       input_size.has_value() ? at::OptionalIntArrayRef(*input_size) : std::nullopt);
}

int64_t cpu_vector_bytes() { return vector_bytes(); }

}  // namespace

TORCH_LIBRARY_IMPL(xception_fast, CPU, m) {
  m.impl("sepconv", &sepconv_cpu);
  m.impl("sepconv_keeping_depthwise", &sepconv_keeping_depthwise_cpu);
  m.impl("depthwise_backward", &depthwise_backward_cpu);
  m.impl("pack_cpu", &pack_cpu);
  m.impl("max_pool_add", &max_pool_add_cpu);
}

// No tensor to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(xception_fast, CompositeExplicitAutograd, m) { m.impl("cpu_vector_bytes", &cpu_vector_bytes); }

}  // namespace xception_fast
