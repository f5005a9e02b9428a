"""pip-installable package.

``pip install .`` installs the Python package and a copy of csrc/; the compiled ops are then
built just in time, on first use, against the installed torch.  This file imports nothing from
torch in that case, so build isolation never pulls a torch wheel.

``FUSED_ACCUM_BUILD_EXT=1 pip install --no-build-isolation .`` builds the ops ahead of time
against the torch already installed: the CPU library always, the CUDA library when that torch
has CUDA.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (fused_accum/_csrc) for the just-in-time build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fused_accum" / "_csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "csrc", target, ignore=shutil.ignore_patterns("*.md"))


def cuda_nvcc_flags():
    """The just-in-time build's nvcc flags (fused_accum/kernels/build.py): one list for both."""
    sys.path.insert(0, str(ROOT))
    from fused_accum.kernels.build import cuda_flags
    return cuda_flags()


# Headers shared by the CPU and CUDA kernels (formulas.h); absolute: ninja runs in the build's
# temporary directory.
INCLUDE = str(ROOT / "csrc" / "include")


def sources(part, suffix):
    """Every source of csrc/<part>, as the just-in-time build takes them (relative paths)."""
    return sorted(path.relative_to(ROOT).as_posix()
                  for path in (ROOT / "csrc" / part).glob(f"*{suffix}"))


def ahead_of_time_extensions():
    if os.environ.get("FUSED_ACCUM_BUILD_EXT") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # An ahead-of-time build may run elsewhere than where it is built: no -march=native unless
    # FUSED_ACCUM_CPU_ARCH asks for an architecture.
    arch = os.environ.get("FUSED_ACCUM_CPU_ARCH")
    cpu_flags = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp", "-ffp-contract=off"] + ([f"-march={arch}"] if arch else [])
    modules = [CppExtension("fused_accum._C_cpu", sources("cpu", ".cpp"), include_dirs=[INCLUDE],
                            extra_compile_args={"cxx": cpu_flags}, extra_link_args=["-fopenmp"]),
               CppExtension("fused_accum._C_collector", sources("autograd", ".cpp"),
                            extra_compile_args={"cxx": ["-O2", "-std=c++17"]})]
    if torch.version.cuda and CUDA_HOME:
        modules.append(CUDAExtension(
            "fused_accum._C_cuda", sources("cuda", ".cu"), include_dirs=[INCLUDE],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": cuda_nvcc_flags()}))
    return modules, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, ext_cmdclass = ahead_of_time_extensions()

setup(
    name="fused_accum",
    version="0.1.0",
    description="Gradient accumulation in fp32 buffers, fused with the optimizer step, for PyTorch",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fused_accum", "fused_accum.*"]),
    # the Triton backend's tuned block sizes (read beside configs.py; python -m fused_accum tune)
    package_data={"fused_accum.kernels.triton_ops": ["tuned.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "transformers": ["transformers>=5.0"],
        "lightning": ["lightning>=2.0"],
        "accelerate": ["accelerate>=1.0"],
        "integrations": ["transformers>=5.0", "lightning>=2.0", "accelerate>=1.0"],
        "test": ["pytest", "ninja", "triton", "transformers>=5.0", "lightning>=2.0",
                 "accelerate>=1.0", "scikit-learn", "matplotlib"],
        "bench": ["matplotlib"],
        "demo": ["scikit-learn", "matplotlib", "transformers>=5.0"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **ext_cmdclass},
)
