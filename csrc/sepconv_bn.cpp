// The op's schema, its argument checks and its CPU kernel.
//
// y = act_out(PW(DW(act_in(x))) + bias) + residual, computed in NHWC chunks of output pixels:
// the depthwise result of a chunk stays in cache and feeds one matrix product with the folded
// pointwise weights; bias, ReLU and residual are applied while the product's rows are still hot.
#include <Python.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstring>

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

// Depthwise 3x3 (stride 1, padding 1) of NHWC pixels [p_begin, p_end) into out[p - p_begin][C].
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void depthwise_rows_impl(const scalar_t* __restrict__ x,
                                                                const acc_t* __restrict__ taps, acc_t* __restrict__ out,
                                                                int64_t p_begin, int64_t p_end, int64_t H, int64_t W,
                                                                int64_t C, bool relu_input) {
  for (int64_t p = p_begin; p < p_end; ++p) {
    const int64_t w = p % W, h = (p / W) % H, n = p / (W * H);
    acc_t* __restrict__ acc = out + (p - p_begin) * C;
    std::fill(acc, acc + C, acc_t(0));
    for (int64_t kh = 0; kh < 3; ++kh) {
      const int64_t ih = h + kh - 1;
      if (ih < 0 || ih >= H) continue;
      for (int64_t kw = 0; kw < 3; ++kw) {
        const int64_t iw = w + kw - 1;
        if (iw < 0 || iw >= W) continue;
        const scalar_t* __restrict__ src = x + ((n * H + ih) * W + iw) * C;
        const acc_t* __restrict__ tap = taps + (kh * 3 + kw) * C;
        if (relu_input) {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t v = elem_cast<acc_t>(src[c]);
            acc[c] += (v < acc_t(0) ? acc_t(0) : v) * tap[c];
          }
        } else {
          for (int64_t c = 0; c < C; ++c) acc[c] += elem_cast<acc_t>(src[c]) * tap[c];
        }
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

#define XF_DEPTHWISE_ROWS(scalar_t, acc_t)                                                                    \
  XF_CPU_CLONES void depthwise_rows(const scalar_t* x, const acc_t* taps, acc_t* out, int64_t p_begin,       \
                                    int64_t p_end, int64_t H, int64_t W, int64_t C, bool relu_input) {       \
    depthwise_rows_impl<scalar_t, acc_t>(x, taps, out, p_begin, p_end, H, W, C, relu_input);                 \
  }
XF_DEPTHWISE_ROWS(float, float)
XF_DEPTHWISE_ROWS(double, double)
XF_DEPTHWISE_ROWS(c10::BFloat16, float)
XF_DEPTHWISE_ROWS(c10::Half, float)
#undef XF_DEPTHWISE_ROWS

// out[p][co] = act(y[p][co] + bias[co]) + residual[p][co], rows [r_begin, r_end) of a chunk.
template <typename scalar_t, typename acc_t>
void epilogue_rows(const acc_t* y, scalar_t* out, const acc_t* bias, const scalar_t* residual, int64_t r_begin,
                   int64_t r_end, int64_t Cout, bool relu_output) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const acc_t* yr = y + r * Cout;
    scalar_t* o = out + r * Cout;
    const scalar_t* res = residual ? residual + r * Cout : nullptr;
    for (int64_t co = 0; co < Cout; ++co) {
      acc_t v = yr[co];
      if (bias) v += bias[co];
      if (relu_output) v = v < acc_t(0) ? acc_t(0) : v;
      if (res) v += elem_cast<acc_t>(res[co]);
      o[co] = elem_cast<scalar_t>(v);
    }
  }
}

// Each thread runs its own matrix products inside the op's parallel region. torch turns MKL's
// dynamic threading off, so an MKL call there would start a nested team per thread and
// oversubscribe the cores; MKL's thread-local setting makes the calls of this thread sequential.
// Looked up at run time (MKL's C entry point; mkl_set_num_threads_local is the Fortran one, by
// pointer): torch builds without MKL simply lack it.
class SequentialBlasInThisThread {
 public:
  SequentialBlasInThisThread() {
    if (set_local_) previous_ = set_local_(1);
  }
  ~SequentialBlasInThisThread() {
    if (set_local_) set_local_(previous_);
  }

 private:
  using SetLocal = int (*)(int);
  static inline const SetLocal set_local_ =
      reinterpret_cast<SetLocal>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  int previous_ = 0;
};

// Output pixels per chunk. Each chunk is one matrix product against the whole pointwise weight,
// which the BLAS packs anew per call, so chunks are kept long (about 256 rows or more where the
// image has them) while the depthwise chunk (rows x C accumulators) stays near 1 MB. The chunk
// count is a multiple of the thread count and the chunks are of equal length, so that every
// thread gets the same work.
int64_t chunk_rows_for(int64_t C, int64_t M, int64_t threads) {
  const int64_t target = std::clamp<int64_t>((int64_t{1} << 18) / C, 256, 2048);
  const int64_t rounds = std::max<int64_t>((M + threads * target - 1) / (threads * target), 1);
  const int64_t chunks = threads * rounds;
  return std::max<int64_t>((M + chunks - 1) / chunks, 1);
}

// Whether the product's arithmetic, not memory traffic, decides the unit's time: Xception's
// middle and exit flows (C >= 512). With fewer channels the chunked path's saved round trips win.
bool product_bound(int64_t C, int64_t Cout, int64_t M) { return C >= 512 && Cout >= 512 && M >= 64; }

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
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto acc_options = x.options().dtype(acc_dtype);
    const auto taps = dw_weight.to(acc_dtype).reshape({C, 9}).t().contiguous();  // [9][C]
    // Half types multiply in fp32: the depthwise result is never rounded to them. (A bfloat16
    // product, as eager's convs use, is faster on CPUs with bf16 dot-product instructions, but
    // moves ReLU's zero crossings away from the exact result's, which the gradients then show.)
    const auto pw_t = pw_weight.detach().to(acc_dtype).reshape({Cout, C}).t();  // [C][Cout] view
    at::Tensor bias_acc;
    if (bias.has_value()) bias_acc = bias->to(acc_dtype).contiguous();

    const int64_t M = N * H * W;
    // fp32 / fp64 outputs take the product in place; half types go through an accumulator buffer.
    constexpr bool in_place = std::is_same_v<scalar_t, acc_t>;

    const scalar_t* x_ptr = x_nhwc.const_data_ptr<scalar_t>();
    const acc_t* taps_ptr = taps.const_data_ptr<acc_t>();
    const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* res_ptr = res_nhwc.defined() ? res_nhwc.const_data_ptr<scalar_t>() : nullptr;

    if (product_bound(C, Cout, M)) {
      // The depthwise result of the whole batch goes through memory once (at these channel counts
      // its bytes are small next to the product's arithmetic) and the product runs as one 1x1
      // convolution over it in oneDNN, which is faster here than per-chunk BLAS calls; BatchNorm
      // stays folded into its weights and bias, ReLU and residual are applied in one pass.
      auto d = at::empty({N, C, H, W}, acc_options.memory_format(at::MemoryFormat::ChannelsLast));
      acc_t* d_ptr = d.mutable_data_ptr<acc_t>();
      at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
        depthwise_rows(x_ptr, taps_ptr, d_ptr + b * C, b, e, H, W, C, relu_input);
      });
      auto y = at::conv2d(d, pw_weight.detach().to(acc_dtype), bias_acc).contiguous(at::MemoryFormat::ChannelsLast);
      if constexpr (in_place) out = y;
      const acc_t* y_ptr = y.const_data_ptr<acc_t>();
      scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
        epilogue_rows<scalar_t, acc_t>(y_ptr, o_ptr, nullptr, res_ptr, b, e, Cout, relu_output);
      });
      return;
    }
    const int64_t chunk = chunk_rows_for(C, M, at::get_num_threads());
    const int64_t num_chunks = (M + chunk - 1) / chunk;
    auto out2d = out.permute({0, 2, 3, 1}).reshape({M, Cout});  // a view: out is NHWC-contiguous
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    // One parallel region: each thread runs whole chunks (depthwise, product, epilogue), so the
    // chunk never leaves its core's cache and threads meet only at the end.
    at::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      // Worker threads do not inherit the op's dispatch state; the product must not see autograd.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      SequentialBlasInThisThread sequential_blas;
      auto dbuf = at::empty({chunk, C}, acc_options);
      auto ybuf = in_place ? at::Tensor() : at::empty({chunk, Cout}, acc_options);
      acc_t* d_ptr = dbuf.mutable_data_ptr<acc_t>();
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t p0 = c * chunk, rows = std::min(chunk, M - p0);
        depthwise_rows(x_ptr, taps_ptr, d_ptr, p0, p0 + rows, H, W, C, relu_input);
        auto y = in_place ? out2d.narrow(0, p0, rows) : ybuf.narrow(0, 0, rows);
        at::mm_out(y, dbuf.narrow(0, 0, rows), pw_t);
        epilogue_rows<scalar_t, acc_t>(y.const_data_ptr<acc_t>(), out_ptr + p0 * Cout, bias_ptr,
                                       res_ptr ? res_ptr + p0 * Cout : nullptr, 0, rows, Cout, relu_output);
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
