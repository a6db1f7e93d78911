"""Build torchkvq._C: the C++ (and, where torch has CUDA, CUDA) kernels behind torch.ops.kvq.*.

Install torch first, then ``pip install --no-build-isolation -e .``. ``TORCHKVQ_CUDA=0|1|auto``
decides whether the CUDA kernels are built (auto: when torch was built with CUDA and nvcc is
found). Torch is deliberately absent from the build requirements: build isolation would
download a multi-GB CUDA torch to compile against.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
import torch


def _want_cuda() -> bool:
    choice = os.environ.get("TORCHKVQ_CUDA", "auto").lower()
    if choice not in ("0", "1", "auto"):
        raise SystemExit(f"TORCHKVQ_CUDA must be 0, 1 or auto, got {choice!r}")
    # torch ignores CUDA_HOME when it was built without CUDA, so decide by torch itself.
    available = torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME") is not None
    )
    if choice == "1" and not available:
        raise SystemExit(
            "TORCHKVQ_CUDA=1 but this torch has no CUDA (torch.version.cuda is None) or nvcc "
            "is missing; install a CUDA build of torch or set TORCHKVQ_CUDA=0"
        )
    return available if choice == "auto" else choice == "1"


def _sanitize_flags() -> list[str]:
    sanitizers = os.environ.get("TORCHKVQ_SANITIZE", "")
    # -O1 (after -O3, so it wins): the usual level for sanitizers, readable reports, and a build
    # several times faster than -O3 with instrumentation.
    return [f"-fsanitize={sanitizers}", "-fno-omit-frame-pointer", "-g", "-O1"] if sanitizers else []


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/registration.cpp", "csrc/store_ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"] + _sanitize_flags()
    kwargs = dict(
        name="torchkvq._C",
        include_dirs=[os.path.join(here, "csrc")],
        extra_link_args=["-fopenmp"] + _sanitize_flags(),
        py_limited_api=False,
    )
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        # No --use_fast_math: CUDA results must be bit-identical to the CPU kernels.
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        return CUDAExtension(
            sources=sources, extra_compile_args={"cxx": cxx + ["-DTORCHKVQ_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=find_packages("src"),
    package_dir={"": "src"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
