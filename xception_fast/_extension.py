"""The compiled library behind the C++ kernels, loaded on the first call that needs it.

The ops' schemas, fakes and autograd are Python (xception_fast.ops), so importing the package,
building and fusing a model, the reference backend and the Triton backend need no compiler. Until
the library is loaded, the CPU and CUDA dispatch keys of its ops hold a loader: the first call
loads ``xception_fast._C`` if it was built at install time, or else compiles the same sources with
the same flags (``_build_config``) against the running torch, then removes the loaders (the C++
kernels take their place) and calls the op again.

On first use the CUDA sources are compiled only where a GPU is present (or
XCEPTION_FAST_BUILD_CUDA=1); ``python -m xception_fast._extension --require-cuda`` compiles them
in any case (CI does, to keep them compiling).
"""
import hashlib
import importlib
import os
import sys
import threading
import time

import torch

from . import _build_config

BUILD_CUDA_ENV = "XCEPTION_FAST_BUILD_CUDA"
_lock = threading.RLock()
_loaded = None  # how the library was loaded, once it is
_loaders = None  # the torch.library registrations of the loaders


def _digest(with_cuda):
    """A name for one build: the sources, flags, torch and target architectures it was made from."""
    h = hashlib.sha256()
    for rel in _build_config.CPU_SOURCES + _build_config.HEADERS + (
            _build_config.CUDA_SOURCES if with_cuda else []):
        with open(os.path.join(_build_config.PACKAGE_DIR, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read())
    h.update(repr((_build_config.compile_args(with_cuda), _build_config.LINK_FLAGS, torch.__version__,
                   os.environ.get("TORCH_CUDA_ARCH_LIST"))).encode())
    return h.hexdigest()[:16]


def _build_on_first_use(with_cuda):
    _build_config.prepare_cuda_environment()
    import torch.utils.cpp_extension as cpp_extension

    root = _build_config.cuda_home()
    if root and cpp_extension.CUDA_HOME != root:
        # cpp_extension fixed its CUDA_HOME when first imported, possibly from a bare nvcc wrapper.
        cpp_extension.CUDA_HOME = root
    name = f"xception_fast_{'cuda' if with_cuda else 'cpu'}_{_digest(with_cuda)}"
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    fresh = not os.path.exists(os.path.join(build_dir, f"{name}.so"))
    start = time.monotonic()
    if fresh:
        what = "C++ and CUDA" if with_cuda else "C++"
        print(f"xception_fast: compiling the {what} kernels against torch {torch.__version__} into {build_dir} "
              f"(once; {'several minutes' if with_cuda else 'a few minutes'} on 2 cores)", file=sys.stderr, flush=True)
    args = _build_config.compile_args(with_cuda)
    cpp_extension.load(
        name=name,
        sources=_build_config.sources(with_cuda),
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args.get("nvcc"),
        extra_ldflags=_build_config.LINK_FLAGS,
        extra_include_paths=_build_config.include_dirs(),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("XCEPTION_FAST_VERBOSE_BUILD", "0") != "0",
    )
    if fresh:
        print(f"xception_fast: compiled in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return f"built on first use ({build_dir})"


def _want_cuda(require_cuda):
    if require_cuda:
        return True
    return _build_config.can_build_cuda(torch.version.cuda) and (
        torch.cuda.is_available() or os.environ.get(BUILD_CUDA_ENV, "0") not in ("", "0"))


def load(require_cuda=False):
    """Make the C++ kernels available; returns how the library was loaded."""
    global _loaded, _loaders
    with _lock:
        if _loaded is None:
            if _loaders is not None:
                # The C++ kernels register for the keys the loaders hold.
                _loaders._destroy()
                _loaders = None
            try:
                importlib.import_module("xception_fast._C")
                _loaded = "ahead-of-time (xception_fast._C)"
            except ImportError:
                _loaded = _build_on_first_use(_want_cuda(require_cuda))
    return _loaded


def install_loaders(library, kernels):
    """Register the loader for each (op, dispatch key) of ``kernels`` on ``library``'s namespace."""
    global _loaders
    _loaders = torch.library.Library(library, "IMPL")
    for op, keys in kernels.items():
        for key in keys:
            _loaders.impl(op, _loader(library, op, key), key)


def _loader(library, op, key):
    def load_and_call(*args):
        load()
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{library}::{op}", key):
            raise RuntimeError(f"{library}::{op}: the compiled library has no {key} kernel (built without its CUDA "
                               f"sources: no CUDA toolkit at build time, or {_build_config.SKIP_CUDA_ENV} set)")
        return getattr(torch.ops, library).__getattr__(op)(*args)

    return load_and_call


def has_cuda_kernel():
    """Whether the loaded library carries the CUDA kernel (loads it first)."""
    load()
    return torch._C._dispatch_has_kernel_for_dispatch_key("xception_fast::sepconv", "CUDA")


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m xception_fast._extension",
                                     description="Load (compiling if needed) the C++/CUDA kernels.")
    parser.add_argument("--require-cuda", action="store_true",
                        help="compile the CUDA sources too, and fail unless the CUDA kernel is in the library "
                             "(CI compiles it on every run)")
    args = parser.parse_args(argv)
    from . import ops  # noqa: F401  - the schemas the kernels register for
    # Under `python -m` this file runs as __main__, a second copy of the module: the loaders that
    # ops installed are the package module's, and so must be the load that replaces them.
    from . import _extension as package_module

    how = package_module.load(require_cuda=args.require_cuda)
    cuda = package_module.has_cuda_kernel()
    print(f"xception_fast extension: {how}; CUDA kernel compiled in: {cuda}")
    return 1 if args.require_cuda and not cuda else 0


if __name__ == "__main__":
    sys.exit(main())
