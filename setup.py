"""Builds xception_fast._C when torch is importable in the build environment.

With pip's default build isolation torch is not there, and nothing is compiled now: the package
then compiles the same sources on first use, against the torch that imports it. To build ahead of
time, install torch first and run `pip install --no-build-isolation -e .`.
"""
import importlib.util
import os

from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "_build_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "xception_fast", "_build_config.py"))
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)


def extension_modules():
    if importlib.util.find_spec("torch") is None:
        return [], {}
    build_config.prepare_cuda_environment()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = build_config.can_build_cuda(torch.version.cuda)
    extension = CUDAExtension if with_cuda else CppExtension
    module = extension(
        build_config.EXTENSION_NAME,
        build_config.sources(with_cuda, relative_to=os.path.dirname(os.path.abspath(__file__))),
        include_dirs=build_config.include_dirs(),
        extra_compile_args=build_config.compile_args(with_cuda),
        extra_link_args=build_config.LINK_FLAGS,
    )
    return [module], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
