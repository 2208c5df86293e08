// The C++ call path's argument checks (the Python path's are in xception_fast/contract.py, with the
// same messages), the NHWC operands, and the Python module that loads the library.
#include <Python.h>

#include "sepconv.h"

#include <c10/util/Exception.h>

#include <array>

extern "C" {
// An empty module so that `import xception_fast._C` loads the library and runs its registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace xception_fast {

namespace {

constexpr std::array<const char*, 4> kActivationNames = {"identity", "relu", "relu6", "hardswish"};
constexpr std::array<int64_t, 4> kKernelSizes = {1, 3, 5, 7};

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// A dtype as Python spells it ("torch.float32"), so that both call paths' messages read the same.
std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return c10::str("torch.", dtype);
  }
}

int64_t output_size(int64_t size, int64_t k, int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t span = size + 2 * padding - dilation * (k - 1) - 1;
  // Floor division, as Python's //, for a negative span too.
  return (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;
}

void check_device_and_dtype(const at::Tensor& x, const at::Tensor& t, const char* name, bool weight) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "sepconv: ", name, " is on ", t.device(), " but x is on ", x.device());
  if (weight) {
    TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, "sepconv: ", name,
                      " must have x's dtype (", dtype_name(x.scalar_type()), ") or float32, got ",
                      dtype_name(t.scalar_type()));
  }
}

}  // namespace

Act parse_activation(c10::string_view name, const char* arg) {
  for (size_t i = 0; i < kActivationNames.size(); ++i) {
    if (name == kActivationNames[i]) return static_cast<Act>(i);
  }
  TORCH_CHECK_VALUE(false, "sepconv: ", arg, " must be one of ('identity', 'relu', 'relu6', 'hardswish'), got '",
                    std::string(name), "'");
}

UnitShape check_args(const at::Tensor& x, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                     const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias,
                     const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, int64_t dilation,
                     c10::string_view act_in, c10::string_view act_mid, c10::string_view act_out) {
  UnitShape s;
  s.act_in = parse_activation(act_in, "act_in");
  s.act_mid = parse_activation(act_mid, "act_mid");
  s.act_out = parse_activation(act_out, "act_out");
  TORCH_CHECK_VALUE(x.dim() == 4, "sepconv: x must be a 4-D [N, C, H, W] tensor, got shape ", shape_str(x));
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                        (dtype == at::kDouble && x.device().is_cpu()),
                    "sepconv: x must be float32, float16 or bfloat16 (float64 on CPU), got ", dtype_name(dtype));
  s.N = x.size(0);
  s.C = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  TORCH_CHECK_VALUE(s.C >= 1 && s.H >= 1 && s.W >= 1, "sepconv: x needs C, H, W >= 1, got shape ", shape_str(x));
  TORCH_CHECK_VALUE(dw_weight.dim() == 4 && dw_weight.size(0) == s.C && dw_weight.size(1) == 1 &&
                        dw_weight.size(2) == dw_weight.size(3),
                    "sepconv: dw_weight must be a depthwise kernel of shape [C, 1, k, k] with C = ", s.C, ", got ",
                    shape_str(dw_weight));
  s.k = dw_weight.size(2);
  TORCH_CHECK_VALUE(std::find(kKernelSizes.begin(), kKernelSizes.end(), s.k) != kKernelSizes.end(),
                    "sepconv: dw_weight's kernel size k must be one of (1, 3, 5, 7), got ", s.k);
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "sepconv: stride must be 1 or 2, got ", stride);
  TORCH_CHECK_VALUE(dilation >= 1, "sepconv: dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(padding >= 0, "sepconv: padding must be >= 0, got ", padding);
  s.stride = stride;
  s.padding = padding;
  s.dilation = dilation;
  s.Ho = output_size(s.H, s.k, stride, padding, dilation);
  s.Wo = output_size(s.W, s.k, stride, padding, dilation);
  TORCH_CHECK_VALUE(s.Ho >= 1 && s.Wo >= 1, "sepconv: x of size ", s.H, "x", s.W,
                    " is smaller than the dilated kernel (", dilation * (s.k - 1) + 1, ") with padding ", padding,
                    ": the output would be empty");
  TORCH_CHECK_VALUE(pw_weight.dim() == 4 && pw_weight.size(1) == s.C && pw_weight.size(2) == 1 &&
                        pw_weight.size(3) == 1 && pw_weight.size(0) >= 1,
                    "sepconv: pw_weight must be a pointwise kernel of shape [Cout, C, 1, 1] with C = ", s.C,
                    ", got ", shape_str(pw_weight));
  s.Cout = pw_weight.size(0);
  if (dw_bias.has_value()) {
    TORCH_CHECK_VALUE(dw_bias->dim() == 1 && dw_bias->size(0) == s.C, "sepconv: dw_bias must have shape [", s.C,
                      "], got ", shape_str(*dw_bias));
  }
  if (pw_bias.has_value()) {
    TORCH_CHECK_VALUE(pw_bias->dim() == 1 && pw_bias->size(0) == s.Cout, "sepconv: pw_bias must have shape [",
                      s.Cout, "], got ", shape_str(*pw_bias));
  }
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->dim() == 4 && residual->size(0) == s.N && residual->size(1) == s.Cout &&
                          residual->size(2) == s.Ho && residual->size(3) == s.Wo,
                      "sepconv: residual must have the output's shape [", s.N, ", ", s.Cout, ", ", s.Ho, ", ", s.Wo,
                      "], got ", shape_str(*residual));
    TORCH_CHECK_VALUE(residual->scalar_type() == dtype, "sepconv: residual must have x's dtype (",
                      dtype_name(dtype), "), got ", dtype_name(residual->scalar_type()));
  }
  check_device_and_dtype(x, dw_weight, "dw_weight", true);
  if (dw_bias.has_value()) check_device_and_dtype(x, *dw_bias, "dw_bias", true);
  check_device_and_dtype(x, pw_weight, "pw_weight", true);
  if (pw_bias.has_value()) check_device_and_dtype(x, *pw_bias, "pw_bias", true);
  if (residual.has_value()) check_device_and_dtype(x, *residual, "residual", false);
  return s;
}

NhwcOperands nhwc_operands(const at::Tensor& x, const UnitShape& s, const std::optional<at::Tensor>& residual) {
  NhwcOperands ops;
  // No element to order where there is no image: contiguous, as the fake's suggest_memory_format
  // makes it for an empty x.
  ops.memory_format = s.N == 0 ? at::MemoryFormat::Contiguous : x.suggest_memory_format();
  if (s.N == 0) return ops;
  ops.x = x.contiguous(at::MemoryFormat::ChannelsLast);
  if (residual.has_value()) ops.residual = residual->contiguous(at::MemoryFormat::ChannelsLast);
  return ops;
}

at::Tensor nhwc_output(const at::Tensor& x, const UnitShape& s) {
  return at::empty({s.N, s.Cout, s.Ho, s.Wo},
                   x.options().memory_format(s.N == 0 ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast));
}

std::vector<int64_t> check_packed_header(at::TensorList packed, int64_t format, const UnitShape& s,
                                         at::ScalarType product_dtype, int64_t expected_length) {
  TORCH_CHECK_VALUE(!packed.empty() && packed[0].defined() && packed[0].device().is_cpu() &&
                        packed[0].scalar_type() == at::kLong && packed[0].dim() == 1 &&
                        packed[0].numel() >= kHeaderLength,
                    "sepconv: packed must be the list that this backend's pack function returned (its first tensor "
                    "is a header); got something else");
  const auto h = packed[0].contiguous();
  std::vector<int64_t> header(h.const_data_ptr<int64_t>(), h.const_data_ptr<int64_t>() + h.numel());
  TORCH_CHECK_VALUE(header[kFormat] == format, "sepconv: packed weights were made for another backend's kernel");
  TORCH_CHECK_VALUE(static_cast<int64_t>(packed.size()) == expected_length,
                    "sepconv: packed must hold ", expected_length, " tensors, got ", packed.size());
  TORCH_CHECK_VALUE(header[kChannels] == s.C && header[kOutChannels] == s.Cout && header[kKernelSize] == s.k,
                    "sepconv: packed weights were made for C = ", header[kChannels], ", Cout = ",
                    header[kOutChannels], ", k = ", header[kKernelSize], ", not for this unit (C = ", s.C,
                    ", Cout = ", s.Cout, ", k = ", s.k, ")");
  TORCH_CHECK_VALUE(header[kProductDtype] == static_cast<int64_t>(product_dtype),
                    "sepconv: packed weights were made for a ", static_cast<at::ScalarType>(header[kProductDtype]),
                    " product, this call multiplies in ", product_dtype,
                    " (x's dtype, autocast or the fp32 precision setting changed): pack them again");
  return header;
}

}  // namespace xception_fast
