"""pip-installable package.  ``pip install .`` installs the Python package; it imports nothing
from torch, so build isolation never pulls a torch wheel.  The compiled ops in csrc/ are added
here as ``ext_modules`` by the compiled-extension work (they build against the installed torch,
so that build will be opt-in and run with ``--no-build-isolation``)."""
from setuptools import find_packages, setup

setup(
    name="fused_accum",
    version="0.1.0",
    description="Gradient accumulation in fp32 buffers, fused with the optimizer step, for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fused_accum", "fused_accum.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest"], "bench": ["matplotlib"]},
)
