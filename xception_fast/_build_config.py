"""The extension's sources and compiler flags: the one list that setup.py and the build on first
use share. It imports nothing from torch, so setup.py can read it before torch is configured.

The sources live inside the package (xception_fast/csrc), so that a wheel or a plain
``pip install .`` carries them and can compile them on first use.
"""
import os
import shutil
import sys
import sysconfig

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "xception_fast._C"

CPU_SOURCES = ["csrc/sepconv_checks.cpp", "csrc/cpu/sepconv_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/sepconv_cuda.cu"]
HEADERS = ["csrc/sepconv.h"]
# at::parallel_for is inlined into the extension: without OpenMP here it runs on one thread. The
# OpenMP runtime it links is the libgomp torch has already loaded.
OPENMP_FLAGS = [] if sys.platform == "darwin" else ["-fopenmp"]
# torch builds in ISO C++ mode, where GCC does not contract a * b + c into one FMA instruction:
# the CPU kernel's depthwise loops need it (it halves their instructions, and rounds once, not twice).
CXX_FLAGS = ["-O3", "-ffp-contract=fast"] + OPENMP_FLAGS
LINK_FLAGS = OPENMP_FLAGS
NVCC_FLAGS = ["-O3", "-lineinfo"]
# Built for Ampere and Hopper unless TORCH_CUDA_ARCH_LIST says otherwise.
DEFAULT_CUDA_ARCHS = "8.0;9.0"
SKIP_CUDA_ENV = "XCEPTION_FAST_SKIP_CUDA"


def cuda_home():
    """The CUDA toolkit root, or None. A bare `nvcc` wrapper on PATH (as in /usr/local/bin) does not
    tell where the headers are, so a root is accepted only if it holds include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and os.path.exists(
                os.path.join(root, "bin", "nvcc")):
            return root
    return None


def can_build_cuda(torch_cuda_version):
    """Whether the CUDA sources can be compiled here: a CUDA build of torch, a toolkit, and no
    opt-out."""
    if os.environ.get(SKIP_CUDA_ENV, "0") not in ("", "0"):
        return False
    return torch_cuda_version is not None and cuda_home() is not None


def include_dirs():
    # CUDA 13 builds of torch ship cusparse.h and friends in site-packages/nvidia/cu13/include,
    # and torch's CUDA headers include them.
    dirs = [os.path.join(PACKAGE_DIR, "csrc")]
    for sub in ("cu13", "cu12"):
        path = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", sub, "include")
        if os.path.isdir(path):
            dirs.append(path)
    return dirs


def prepare_cuda_environment():
    """Point torch.utils.cpp_extension at the toolkit and the default architectures; call before
    importing it."""
    root = cuda_home()
    if root:
        os.environ["CUDA_HOME"] = root
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return root


def sources(with_cuda, relative_to=None):
    """The sources to compile, as absolute paths, or relative to ``relative_to`` (setup.py wants
    paths relative to its own directory)."""
    files = [os.path.join(PACKAGE_DIR, f) for f in CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])]
    return [os.path.relpath(f, relative_to) for f in files] if relative_to else files


def compile_args(with_cuda):
    defines = ["-DXF_WITH_CUDA"] if with_cuda else []
    args = {"cxx": CXX_FLAGS + defines}
    if with_cuda:
        args["nvcc"] = NVCC_FLAGS + defines
    return args
