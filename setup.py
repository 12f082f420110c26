"""Build script: the package, kernels/ mapped to paam_fast.kernels, and the optional C++
extension paam_fast._C from csrc/ (CUDA when nvcc and a CUDA torch are present, else CPU C++).

PAAM_FAST_BUILD_EXT=0 skips the extension; the package then runs on its pure-PyTorch references
(``python -m paam_fast.info`` says which backend each op uses).
"""

import glob
import os

from setuptools import setup

packages = ["paam_fast", "paam_fast.models", "paam_fast.bench", "paam_fast.kernels"]
package_dir = {"paam_fast": "paam_fast", "paam_fast.kernels": "kernels"}

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cpp"))
if sources and os.environ.get("PAAM_FAST_BUILD_EXT", "1") != "0":
    from torch.utils import cpp_extension

    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    use_cuda = bool(cuda_sources) and cpp_extension.CUDA_HOME is not None and \
        os.environ.get("PAAM_FAST_BUILD_CUDA", "1") != "0"
    if use_cuda:
        # Without a visible GPU, torch's build asks the (absent) device for its architecture
        # and fails (IndexError); the H200 (sm_90) is the target unless the caller says more.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    Ext = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    ext_modules = [Ext("paam_fast._C", sources + (cuda_sources if use_cuda else []),
                       extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]} if use_cuda
                       else ["-O3"])]
    cmdclass = {"build_ext": cpp_extension.BuildExtension}

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
