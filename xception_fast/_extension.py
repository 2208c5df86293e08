"""Loads the compiled library that defines ``torch.ops.xception_fast.sepconv_bn``.

Prefers ``xception_fast._C`` built at install time; otherwise compiles the same sources with the
same flags (``_build_config``) against the torch that is running, once, and says so.
"""
import importlib
import os
import sys
import threading

import torch

from . import _build_config

_lock = threading.Lock()
_loaded = None  # "ahead-of-time" or the path of the library built on first use


def _build_on_first_use():
    root = _build_config.prepare_cuda_environment()
    import torch.utils.cpp_extension as cpp_extension

    if root and cpp_extension.CUDA_HOME != root:
        # cpp_extension fixed its CUDA_HOME when first imported, possibly from a bare nvcc wrapper.
        cpp_extension.CUDA_HOME = root
    with_cuda = _build_config.want_cuda(torch.version.cuda)
    print(f"xception_fast: the {'C++/CUDA' if with_cuda else 'C++'} extension was not built at install; building "
          f"it against torch {torch.__version__} (compiled on first use, reused while the sources are unchanged)",
          file=sys.stderr, flush=True)
    args = _build_config.compile_args(with_cuda)
    return cpp_extension.load(
        name="xception_fast_C_" + torch.__version__.replace(".", "_").replace("+", "_"),
        sources=_build_config.sources(with_cuda, absolute=True),
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args.get("nvcc"),
        extra_ldflags=_build_config.LINK_FLAGS,
        extra_include_paths=_build_config.include_dirs(),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("XCEPTION_FAST_VERBOSE_BUILD", "0") != "0",
    )


def load():
    """Make the op available; returns how it was loaded."""
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                importlib.import_module("xception_fast._C")
                _loaded = "ahead-of-time"
            except ImportError:
                _build_on_first_use()
                _loaded = "built on first use"
    return _loaded


def has_cuda_kernel():
    """Whether the loaded library carries the CUDA kernel."""
    load()
    return torch._C._dispatch_has_kernel_for_dispatch_key("xception_fast::sepconv_bn", "CUDA")


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m xception_fast._extension",
                                     description="Load (compiling if needed) the C++/CUDA extension.")
    parser.add_argument("--require-cuda", action="store_true",
                        help="fail unless the CUDA kernel was compiled in (CI compiles it on every run)")
    args = parser.parse_args(argv)
    how = load()
    cuda = has_cuda_kernel()
    print(f"xception_fast extension: {how}; CUDA kernel compiled in: {cuda}")
    return 1 if args.require_cuda and not cuda else 0


if __name__ == "__main__":
    sys.exit(main())
