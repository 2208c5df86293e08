"""The backends every op test runs on: one table, so that one suite covers them all.

- cpu: the C++ kernel on CPU tensors;
- triton: the Triton kernel, compiled on a GPU, or on CPU tensors through the interpreter
  (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports it);
- cuda: the CUDA kernel (GPU only);
- reference: the eager composition, through the same Python API.
"""
import dataclasses

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: str
    dtypes: tuple       # what the exactness tests run in
    interpreted: bool = False  # the Triton interpreter: one Python pass per program, keep shapes small
    # Triton on a GPU: every (dtype, options, shape specialisation) is a fresh compile and autotune,
    # so the wide matrices run one dtype there (the GPU-only tests cover the others).
    compiles_per_case: bool = False

    def op(self):
        """The op that implements the backend (torch.ops.xception_fast.*), or None for the reference."""
        if self.name == "triton":
            from xception_fast import triton_sepconv

            return triton_sepconv.sepconv_triton
        if self.name in ("cpu", "cuda"):
            import xception_fast.ops  # noqa: F401  - defines the op

            return torch.ops.xception_fast.sepconv
        return None

    def __str__(self):
        return self.name


HALF = (torch.float32, torch.bfloat16, torch.float16)
CPU = Backend("cpu", "cpu", HALF + (torch.float64,))
TRITON = Backend("triton", "cuda" if HAS_CUDA else "cpu", HALF if HAS_CUDA else (torch.float32, torch.bfloat16),
                 interpreted=not HAS_CUDA, compiles_per_case=HAS_CUDA)
CUDA = Backend("cuda", "cuda", HALF)
REFERENCE = Backend("reference", "cpu", (torch.float32, torch.bfloat16))

ALL = [CPU, TRITON, pytest.param(CUDA, marks=pytest.mark.gpu), REFERENCE]
KERNELS = [CPU, TRITON, pytest.param(CUDA, marks=pytest.mark.gpu)]
