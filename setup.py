"""Builds lune_fast._C: the C++ CPU ops always, the CUDA sources too when torch has CUDA and nvcc exists.

Install with `pip install --no-build-isolation .` (the Makefile does): the extension must compile against
the torch already in the environment, and an isolated build would fetch another (multi-GB) torch.
"""
import os
import sys
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CPU_SOURCES = ["csrc/ops.cpp", "csrc/linear_logprob.cpp", "csrc/cpu/rows.cpp", "csrc/cpu/rms_norm.cpp",
               "csrc/cpu/few_rows_linear.cpp", "csrc/cpu/decode_attention.cpp",
               "csrc/cpu/decode_layer.cpp"]
CUDA_SOURCES = ["csrc/cuda/rows.cu", "csrc/cuda/rows_cuda.cpp"]


def want_cuda() -> bool:
    if os.environ.get("LUNE_FAST_NO_CUDA") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    # OpenMP: at::parallel_for in our ops runs on torch's threads only when compiled with it (the process shares
    # the libgomp torch loaded: one thread pool)
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++17", *omp]
    if want_cuda():
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "lune_fast._C", CPU_SOURCES + CUDA_SOURCES, define_macros=[("LUNE_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=omp)
    return cpp_extension.CppExtension("lune_fast._C", CPU_SOURCES, extra_compile_args={"cxx": cxx},
                                      extra_link_args=omp)


setup(
    packages=["lune_fast", "lune_fast.kernels", "lune_fast.assets"],
    package_dir={"lune_fast": "lune_fast", "lune_fast.kernels": "kernels"},
    package_data={"lune_fast.assets": ["*.jsonl", "*.txt", "*.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
