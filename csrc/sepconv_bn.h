#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace xception_fast {

// Throws a c10::Error that names the offending argument; shared by every backend of the op.
void check_sepconv_bn_args(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual);

}  // namespace xception_fast
