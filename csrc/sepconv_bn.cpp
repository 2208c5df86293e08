// The op's schema, its argument checks and its CPU kernel.
//
// y = act_out(PW(DW(act_in(x))) + bias) + residual, computed in NHWC chunks of output pixels:
// the depthwise result of a chunk stays in cache and feeds a register-tiled product with the
// folded pointwise weights; bias, ReLU and residual are applied to each tile before its one store.
#include <Python.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "sepconv_bn.h"

extern "C" {
// An empty module so that `import xception_fast._C` loads the library and runs its registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace xception_fast {

namespace {

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "sepconv_bn: ", name, " is on ", t.device(), " but x is on ", x.device());
}

void check_weight_dtype(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, "sepconv_bn: ", name,
              " must have x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type());
}

}  // namespace

void check_sepconv_bn_args(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4, "sepconv_bn: x must be a 4-D [N, C, H, W] tensor, got shape ", shape_str(x));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  (dtype == at::kDouble && x.device().is_cpu()),
              "sepconv_bn: x must be float32, float16 or bfloat16 (float64 on CPU), got ", dtype);
  const int64_t C = x.size(1);
  TORCH_CHECK(C >= 1 && x.size(2) >= 1 && x.size(3) >= 1,
              "sepconv_bn: x needs C, H, W >= 1, got shape ", shape_str(x));
  TORCH_CHECK(dw_weight.dim() == 4 && dw_weight.size(0) == C && dw_weight.size(1) == 1 && dw_weight.size(2) == 3 &&
                  dw_weight.size(3) == 3,
              "sepconv_bn: dw_weight must be a depthwise 3x3 kernel of shape [C, 1, 3, 3] = [", C,
              ", 1, 3, 3], got ", shape_str(dw_weight));
  TORCH_CHECK(pw_weight.dim() == 4 && pw_weight.size(1) == C && pw_weight.size(2) == 1 && pw_weight.size(3) == 1 &&
                  pw_weight.size(0) >= 1,
              "sepconv_bn: pw_weight must be a pointwise kernel of shape [Cout, C, 1, 1] with C = ", C, ", got ",
              shape_str(pw_weight));
  const int64_t Cout = pw_weight.size(0);
  check_same_device(x, dw_weight, "dw_weight");
  check_same_device(x, pw_weight, "pw_weight");
  check_weight_dtype(x, dw_weight, "dw_weight");
  check_weight_dtype(x, pw_weight, "pw_weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cout, "sepconv_bn: bias must have shape [Cout] = [", Cout,
                "], got ", shape_str(*bias));
    check_same_device(x, *bias, "bias");
    check_weight_dtype(x, *bias, "bias");
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 4 && residual->size(0) == x.size(0) && residual->size(1) == Cout &&
                    residual->size(2) == x.size(2) && residual->size(3) == x.size(3),
                "sepconv_bn: residual must have the output's shape [", x.size(0), ", ", Cout, ", ", x.size(2), ", ",
                x.size(3), "], got ", shape_str(*residual));
    check_same_device(x, *residual, "residual");
    TORCH_CHECK(residual->scalar_type() == dtype, "sepconv_bn: residual must have x's dtype (", dtype, "), got ",
                residual->scalar_type());
  }
}

NhwcOperands nhwc_operands(const at::Tensor& x, const at::Tensor& pw_weight,
                           const std::optional<at::Tensor>& residual) {
  NhwcOperands ops;
  ops.memory_format = x.suggest_memory_format();
  ops.out = at::empty({x.size(0), pw_weight.size(0), x.size(2), x.size(3)},
                      x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (ops.out.numel() == 0) return ops;
  ops.x = x.contiguous(at::MemoryFormat::ChannelsLast);
  if (residual.has_value()) ops.residual = residual->contiguous(at::MemoryFormat::ChannelsLast);
  return ops;
}

namespace {

// Element conversions. bfloat16 <-> float by bit operations the compiler can vectorise (c10's own
// conversions are scalar calls in these loops); round to nearest even, NaN kept NaN.
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

// Both kernels' inner loops work on one vector of channels at a time: 64 bytes, one AVX-512
// register or two AVX2 ones.
constexpr int kVectorBytes = 64;
template <typename acc_t>
constexpr int64_t kLanes = kVectorBytes / sizeof(acc_t);
// GCC vector types (one per accumulator dtype: the attribute cannot take a template parameter).
template <typename acc_t>
struct VectorOf;
template <>
struct VectorOf<float> {
  using type = float __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VectorOf<double> {
  using type = double __attribute__((vector_size(kVectorBytes)));
};

// One vector of channels (of x, a residual or the bias), in the accumulator dtype.
template <typename acc_t, typename scalar_t>
inline __attribute__((always_inline)) typename VectorOf<acc_t>::type load_vector(const scalar_t* src) {
  typename VectorOf<acc_t>::type v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&v, src, sizeof(v));
  } else {
    for (int64_t j = 0; j < kLanes<acc_t>; ++j) v[j] = elem_cast<acc_t>(src[j]);
  }
  return v;
}

// Depthwise 3x3 (stride 1, padding 1) of NHWC pixels [p_begin, p_end) into out[p - p_begin][C].
// Pixels go in batches whose neighbours' offsets are found once; then, one vector of channels at
// a time, the nine taps stay in registers while each pixel's sum builds in a register and is
// stored once (summed per channel in the same tap order as a loop over channels would).
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void depthwise_rows_impl(const scalar_t* __restrict__ x,
                                                                const acc_t* __restrict__ taps, acc_t* __restrict__ out,
                                                                int64_t p_begin, int64_t p_end, int64_t H, int64_t W,
                                                                int64_t C, bool relu_input) {
  using vec_t = typename VectorOf<acc_t>::type;
  constexpr int64_t lanes = kLanes<acc_t>;
  constexpr int64_t kBatch = 64;
  int64_t neighbour[kBatch][9];  // element offset of each tap's input pixel, -1 outside the image
  int64_t w = p_begin % W, h = (p_begin / W) % H, n = p_begin / (W * H);
  for (int64_t q0 = p_begin; q0 < p_end; q0 += kBatch) {
    const int64_t count = std::min(kBatch, p_end - q0);
    for (int64_t q = 0; q < count; ++q) {
      for (int64_t t = 0; t < 9; ++t) {
        const int64_t ih = h + t / 3 - 1, iw = w + t % 3 - 1;
        neighbour[q][t] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? ((n * H + ih) * W + iw) * C : -1;
      }
      if (++w == W) {
        w = 0;
        if (++h == H) {
          h = 0;
          ++n;
        }
      }
    }
    acc_t* __restrict__ dst = out + (q0 - p_begin) * C;
    int64_t c0 = 0;
    for (; c0 + lanes <= C; c0 += lanes) {
      vec_t tap[9];
      for (int64_t t = 0; t < 9; ++t) std::memcpy(&tap[t], taps + t * C + c0, sizeof(vec_t));
      for (int64_t q = 0; q < count; ++q) {
        vec_t acc = {};
        for (int64_t t = 0; t < 9; ++t) {
          if (neighbour[q][t] < 0) continue;
          vec_t v = load_vector<acc_t>(x + neighbour[q][t] + c0);
          if (relu_input) v = v < acc_t(0) ? vec_t{} : v;
          acc += v * tap[t];
        }
        std::memcpy(dst + q * C + c0, &acc, sizeof(acc));
      }
    }
    for (int64_t q = 0; q < count && c0 < C; ++q) {
      for (int64_t c = c0; c < C; ++c) {
        acc_t acc = 0;
        for (int64_t t = 0; t < 9; ++t) {
          if (neighbour[q][t] < 0) continue;
          const acc_t v = elem_cast<acc_t>(x[neighbour[q][t] + c]);
          acc += (relu_input && v < acc_t(0) ? acc_t(0) : v) * taps[t * C + c];
        }
        dst[q * C + c] = acc;
      }
    }
  }
}

// One non-template entry point per dtype, so that the compiler can build AVX-512 and AVX2 clones
// of the channel loops and pick one at load time; the portable build still runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__)
#define XF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define XF_CPU_CLONES
#endif

// The (dtype, accumulator dtype) pairs the CPU kernel is instantiated for.
#define XF_FOR_EACH_CPU_DTYPE(X) X(float, float) X(double, double) X(c10::BFloat16, float) X(c10::Half, float)

#define XF_DEPTHWISE_ROWS(scalar_t, acc_t)                                                                    \
  XF_CPU_CLONES void depthwise_rows(const scalar_t* x, const acc_t* taps, acc_t* out, int64_t p_begin,       \
                                    int64_t p_end, int64_t H, int64_t W, int64_t C, bool relu_input) {       \
    depthwise_rows_impl<scalar_t, acc_t>(x, taps, out, p_begin, p_end, H, W, C, relu_input);                 \
  }
XF_FOR_EACH_CPU_DTYPE(XF_DEPTHWISE_ROWS)
#undef XF_DEPTHWISE_ROWS

// act(v + *bias) + *residual in the output's dtype; bias and residual may be null.
template <typename scalar_t, typename acc_t>
inline scalar_t epilogue_value(acc_t v, const acc_t* bias, bool relu_output, const scalar_t* residual) {
  if (bias) v += *bias;
  if (relu_output) v = v < acc_t(0) ? acc_t(0) : v;
  if (residual) v += elem_cast<acc_t>(*residual);
  return elem_cast<scalar_t>(v);
}

// The pointwise product, register-tiled: a tile of kTileRows output pixels x one vector of output
// channels accumulates over all C input channels in registers (the depthwise rows it reads stay in
// L1 across the panels of weights), then bias, ReLU and residual are applied and the tile is stored
// once, in the output's dtype. The weights are packed per call into panels of one vector's width
// ([panel][C][lanes], zero-padded past Cout), so that each step of the C loop is one vector load.
// Why not the BLAS: with C of 64 to 256, the BLAS packs its operands anew per call and reaches
// about 0.7x this loop's speed on the products of Xception's entry flow, and its result would
// take another pass through memory for the epilogue.
// 6 vectors of accumulators: 12 registers of AVX2, 6 of AVX-512 (8 or 12 rows measured no faster
// with AVX-512 here, and spill with AVX2).
constexpr int64_t kTileRows = 6;
// The C loop sums in blocks of this many terms, each block's partial sums then added to the
// tile's: rounding error then grows with C / kSumBlock + kSumBlock rather than with C, as in the
// BLAS's own blocked sums (one running sum over C = 1536 is several times less exact than eager).
constexpr int64_t kSumBlock = 64;

template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void product_rows_impl(const acc_t* __restrict__ d, int64_t blocks,
                                                              int64_t valid_rows, int64_t C,
                                                              const acc_t* __restrict__ packed, int64_t Cout,
                                                              const acc_t* __restrict__ bias,
                                                              const scalar_t* __restrict__ residual,
                                                              scalar_t* __restrict__ out, bool relu_output) {
  using vec_t = typename VectorOf<acc_t>::type;
  constexpr int64_t lanes = kLanes<acc_t>;
  const int64_t panels = (Cout + lanes - 1) / lanes;
  for (int64_t b = 0; b < blocks; ++b) {
    const acc_t* __restrict__ a = d + b * kTileRows * C;
    const int64_t rows = std::min(kTileRows, valid_rows - b * kTileRows);
    for (int64_t p = 0; p < panels; ++p) {
      const acc_t* __restrict__ w = packed + p * C * lanes;
      vec_t acc[kTileRows] = {};
      for (int64_t k0 = 0; k0 < C; k0 += kSumBlock) {
        vec_t partial[kTileRows] = {};
        for (int64_t k = k0; k < std::min(C, k0 + kSumBlock); ++k) {
          vec_t wk;
          std::memcpy(&wk, w + k * lanes, sizeof(wk));
#pragma GCC unroll 6
          for (int64_t r = 0; r < kTileRows; ++r) partial[r] += a[r * C + k] * wk;
        }
#pragma GCC unroll 6
        for (int64_t r = 0; r < kTileRows; ++r) acc[r] += partial[r];
      }
      const int64_t co0 = p * lanes, cols = std::min(lanes, Cout - co0);
      if (cols < lanes) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = b * kTileRows + r;
          scalar_t* o = out + row * Cout + co0;
          const scalar_t* res = residual ? residual + row * Cout + co0 : nullptr;
          for (int64_t j = 0; j < cols; ++j) {
            o[j] = epilogue_value<scalar_t>(acc[r][j], bias ? bias + co0 + j : nullptr, relu_output,
                                            res ? res + j : nullptr);
          }
        }
        continue;
      }
      // A whole vector of output channels: the same epilogue in vector operations (at C = 64 the
      // scalar form took about a quarter of the unit's time).
      const vec_t bias_v = bias ? load_vector<acc_t>(bias + co0) : vec_t{};
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = b * kTileRows + r;
        vec_t v = acc[r];
        if (bias) v += bias_v;
        if (relu_output) v = v < acc_t(0) ? vec_t{} : v;
        if (residual) v += load_vector<acc_t>(residual + row * Cout + co0);
        scalar_t* o = out + row * Cout + co0;
        for (int64_t j = 0; j < lanes; ++j) o[j] = elem_cast<scalar_t>(v[j]);
      }
    }
  }
}

#define XF_PRODUCT_ROWS(scalar_t, acc_t)                                                                      \
  XF_CPU_CLONES void product_rows(const acc_t* d, int64_t blocks, int64_t valid_rows, int64_t C,             \
                                  const acc_t* packed, int64_t Cout, const acc_t* bias, const scalar_t* residual, \
                                  scalar_t* out, bool relu_output) {                                          \
    product_rows_impl<scalar_t, acc_t>(d, blocks, valid_rows, C, packed, Cout, bias, residual, out, relu_output); \
  }
XF_FOR_EACH_CPU_DTYPE(XF_PRODUCT_ROWS)
#undef XF_PRODUCT_ROWS

// out[p][co] = act(y[p][co]) + residual[p][co], rows [r_begin, r_end) (y has the bias added).
template <typename scalar_t, typename acc_t>
void epilogue_rows(const acc_t* y, scalar_t* out, const scalar_t* residual, int64_t r_begin, int64_t r_end,
                   int64_t Cout, bool relu_output) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const acc_t* yr = y + r * Cout;
    scalar_t* o = out + r * Cout;
    const scalar_t* res = residual ? residual + r * Cout : nullptr;
    for (int64_t co = 0; co < Cout; ++co) {
      o[co] = epilogue_value<scalar_t>(yr[co], static_cast<const acc_t*>(nullptr), relu_output,
                                       res ? res + co : nullptr);
    }
  }
}

// Whether the product goes to oneDNN instead of the register tiles: the tiles read the whole
// weight matrix once per tile of rows, from L2 or L3, which keeps up with the arithmetic up to a
// few MB of weights (Xception's 728 -> 728 and 728 -> 1024 units, measured here faster than
// oneDNN); past that (1024 -> 1536, 1536 -> 2048) oneDNN's cache-blocked kernels are faster.
bool product_in_onednn(int64_t C, int64_t Cout, int64_t acc_size) { return C * Cout * acc_size > (int64_t{4} << 20); }

// [Cout, C, 1, 1] -> [panel][C][lanes] in the accumulator dtype, zero past Cout.
at::Tensor pack_pointwise(const at::Tensor& pw_weight, at::ScalarType acc_dtype, int64_t lanes) {
  const int64_t Cout = pw_weight.size(0), C = pw_weight.size(1);
  const int64_t panels = (Cout + lanes - 1) / lanes;
  auto w = pw_weight.detach().reshape({Cout, C}).to(acc_dtype);
  w = at::constant_pad_nd(w, {0, 0, 0, panels * lanes - Cout});
  return w.reshape({panels, lanes, C}).transpose(1, 2).contiguous();
}

// Tiles per chunk of a thread's work: the depthwise result of a chunk (rows x C accumulators)
// stays within about 64 KB, so the tile being multiplied reads it from L1 or L2.
int64_t chunk_blocks_for(int64_t C, int64_t acc_size) {
  return std::clamp<int64_t>((int64_t{1} << 16) / (kTileRows * C * acc_size), 1, 16);
}

at::Tensor sepconv_bn_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                          const std::optional<at::Tensor>& bias, bool relu_input, bool relu_output,
                          const std::optional<at::Tensor>& residual) {
  check_sepconv_bn_args(x, dw_weight, pw_weight, bias, residual);
  TORCH_CHECK(x.device().is_cpu(), "sepconv_bn (CPU kernel): x must be a CPU tensor, got ", x.device());
  // The ATen calls inside compute in the dtypes chosen here, even when the op is called under
  // autocast (which would otherwise recast the inner convolution's operands).
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Cout = pw_weight.size(0);
  auto [x_nhwc, res_nhwc, out, memory_format] = nhwc_operands(x, pw_weight, residual);
  if (out.numel() == 0) return out.contiguous(memory_format);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sepconv_bn_cpu", [&] {
    // Half types accumulate, and multiply, in fp32: the depthwise result is never rounded to them.
    // (A bfloat16 product, as eager's convs use, is faster on CPUs with bf16 dot-product
    // instructions, but moves ReLU's zero crossings away from the exact result's, which the
    // gradients then show.)
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto taps = dw_weight.detach().to(acc_dtype).reshape({C, 9}).t().contiguous();  // [9][C]
    at::Tensor bias_acc;
    if (bias.has_value()) bias_acc = bias->detach().to(acc_dtype).contiguous();

    const scalar_t* x_ptr = x_nhwc.const_data_ptr<scalar_t>();
    const acc_t* taps_ptr = taps.const_data_ptr<acc_t>();
    const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* res_ptr = res_nhwc.defined() ? res_nhwc.const_data_ptr<scalar_t>() : nullptr;
    const int64_t M = N * H * W;

    if (product_in_onednn(C, Cout, sizeof(acc_t))) {
      // The depthwise result of the whole batch goes through memory once (at these channel counts
      // its bytes are small next to the product's arithmetic) and the product runs as one 1x1
      // convolution over it in oneDNN; BatchNorm stays folded into its weights and bias, ReLU and
      // residual are applied in one pass.
      auto d = at::empty({N, C, H, W}, x.options().dtype(acc_dtype).memory_format(at::MemoryFormat::ChannelsLast));
      acc_t* d_ptr = d.mutable_data_ptr<acc_t>();
      at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
        depthwise_rows(x_ptr, taps_ptr, d_ptr + b * C, b, e, H, W, C, relu_input);
      });
      auto y = at::conv2d(d, pw_weight.detach().to(acc_dtype), bias_acc).contiguous(at::MemoryFormat::ChannelsLast);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        out = y;
        if (!relu_output && res_ptr == nullptr) return;  // y is already the result
      }
      const acc_t* y_ptr = y.const_data_ptr<acc_t>();
      scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
        epilogue_rows<scalar_t, acc_t>(y_ptr, o_ptr, res_ptr, b, e, Cout, relu_output);
      });
      return;
    }
    const auto packed = pack_pointwise(pw_weight, acc_dtype, kLanes<acc_t>);
    const acc_t* packed_ptr = packed.const_data_ptr<acc_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const int64_t blocks = (M + kTileRows - 1) / kTileRows;
    const int64_t chunk_blocks = chunk_blocks_for(C, sizeof(acc_t));
    // Each thread runs whole chunks (depthwise into its own buffer, product, epilogue), so a chunk
    // never leaves its core's caches and threads meet only at the end.
    at::parallel_for(0, blocks, chunk_blocks, [&](int64_t b_begin, int64_t b_end) {
      std::vector<acc_t> d(static_cast<size_t>(chunk_blocks * kTileRows * C));
      for (int64_t b0 = b_begin; b0 < b_end; b0 += chunk_blocks) {
        const int64_t nb = std::min(chunk_blocks, b_end - b0);
        const int64_t p0 = b0 * kTileRows, rows = std::min(nb * kTileRows, M - p0);
        depthwise_rows(x_ptr, taps_ptr, d.data(), p0, p0 + rows, H, W, C, relu_input);
        product_rows(d.data(), nb, rows, C, packed_ptr, Cout, bias_ptr, res_ptr ? res_ptr + p0 * Cout : nullptr,
                     out_ptr + p0 * Cout, relu_output);
      }
    });
  });
  return out.contiguous(memory_format);
}

}  // namespace

TORCH_LIBRARY(xception_fast, m) {
  m.def(
      "sepconv_bn(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? bias, bool relu_input, bool relu_output, "
      "Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(xception_fast, CPU, m) { m.impl("sepconv_bn", &sepconv_bn_cpu); }

}  // namespace xception_fast
