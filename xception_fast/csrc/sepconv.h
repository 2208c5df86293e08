// What the C++ kernels of the fused separable unit share: its activations, its argument checks and
// its operands in the kernels' NHWC layout. The op's schema is defined in Python
// (xception_fast/contract.py, SCHEMA); csrc/cpu and csrc/cuda register kernels for it.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <vector>

namespace xception_fast {

enum class Act : int { kIdentity = 0, kRelu = 1, kRelu6 = 2, kHardswish = 3 };

// `arg` names the argument in the error ("act_in", ...).
Act parse_activation(c10::string_view name, const char* arg);

// The unit's sizes, as the checks found them.
struct UnitShape {
  int64_t N, C, H, W;  // x
  int64_t Cout;        // pw_weight.size(0)
  int64_t k;           // depthwise kernel size (odd)
  int64_t stride, padding, dilation;
  int64_t Ho, Wo;      // output size
  Act act_in, act_mid, act_out;
};

// Throws a c10::Error (ValueError in Python) naming the offending argument; the messages are
// those of the Python checks (xception_fast/contract.py, check_args).
UnitShape check_args(const at::Tensor& x, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                     const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias,
                     const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, int64_t dilation,
                     c10::string_view act_in, c10::string_view act_mid, c10::string_view act_out);

// What every kernel computes on: x and residual channels-last (copied when they are not);
// kernels return their output as out.contiguous(memory_format), x's own format.
struct NhwcOperands {
  at::Tensor x, residual;
  at::MemoryFormat memory_format;
};
NhwcOperands nhwc_operands(const at::Tensor& x, const UnitShape& s, const std::optional<at::Tensor>& residual);

// The output for a kernel that writes it itself: channels-last (contiguous when it has no image, as
// the fake's suggest_memory_format makes it for an empty x).
at::Tensor nhwc_output(const at::Tensor& x, const UnitShape& s);

// The packed-weights header: the first tensor of every backend's packed list, an int64 CPU tensor
// of kHeaderLength entries, so that a kernel can refuse weights packed for something else.
enum HeaderField : int64_t {
  kFormat = 0,        // which backend's layout (kCpuFormat, kGpuFormat)
  kChannels,          // C
  kOutChannels,       // Cout
  kKernelSize,        // k
  kProductDtype,      // the c10::ScalarType the pointwise product runs in
  kLayout,            // the backend's own choice (e.g. the CPU product's strategy)
  kHeaderLength
};
constexpr int64_t kCpuFormat = 0x5843;  // "XC"
constexpr int64_t kGpuFormat = 0x5847;  // "XG"

// Checks that `packed` was made for this unit in `format` for `product_dtype`; returns the header.
std::vector<int64_t> check_packed_header(at::TensorList packed, int64_t format, const UnitShape& s,
                                         at::ScalarType product_dtype, int64_t expected_length);

// The weights a call computes with: the packed list it was given, or else `pack()`'s, made for
// this call and kept alive in `own`.
template <typename Pack>
at::TensorList packed_or_packing(const std::optional<at::TensorList>& packed, std::vector<at::Tensor>& own,
                                 Pack&& pack) {
  if (packed.has_value()) return *packed;
  own = pack();
  return own;
}

}  // namespace xception_fast
