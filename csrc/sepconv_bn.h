#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace xception_fast {

// Throws a c10::Error that names the offending argument; shared by every backend of the op.
void check_sepconv_bn_args(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual);

// What every kernel computes on: x and residual channels-last (copied when they are not), the
// output allocated channels-last; kernels return out.contiguous(memory_format), x's own format.
struct NhwcOperands {
  at::Tensor x, residual, out;
  at::MemoryFormat memory_format;
};
NhwcOperands nhwc_operands(const at::Tensor& x, const at::Tensor& pw_weight,
                           const std::optional<at::Tensor>& residual);

}  // namespace xception_fast
