import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. The interpreter is
# chosen when @triton.jit decorates, so this must be set before xception_fast.triton_sepconv imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU every new problem the Triton kernel meets is autotuned (a compile per config): the tests
# check results, not speed, so each compiles one config (xception_fast.triton_sepconv).
os.environ.setdefault("XCEPTION_FAST_TRITON_AUTOTUNE", "0")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def float32_without_tf32():
    """float32 on a GPU is compared in full precision on both sides (eager cuDNN and the kernels
    follow the same flag); the tests of TF32 set the flag themselves."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved
