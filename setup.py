"""Build specrt: setup.py drives CMake (+ Ninja) to produce the extension ``specrt._C``.

CPU or CUDA is decided from how torch was built (``torch.version.cuda``), never from whether
a GPU is present; ``SPECRT_TARGET_DEVICE=cpu|cuda`` overrides. CUDA arch list: the
``SPECRT_CUDA_ARCHS`` variable (CMake syntax, default ``90a``), or ``TORCH_CUDA_ARCH_LIST``.

Always install with ``--no-build-isolation``: an isolated build would fetch a CUDA torch.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _target_device() -> str:
    forced = os.environ.get("SPECRT_TARGET_DEVICE", "").strip().lower()
    if forced:
        if forced not in ("cpu", "cuda"):
            raise RuntimeError(f"SPECRT_TARGET_DEVICE must be 'cpu' or 'cuda', got {forced!r}")
        return forced
    import torch

    return "cuda" if torch.version.cuda else "cpu"


def _cuda_archs() -> str:
    if os.environ.get("SPECRT_CUDA_ARCHS"):
        return os.environ["SPECRT_CUDA_ARCHS"]
    torch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if torch_list:
        archs = []
        for a in torch_list.replace(",", ";").replace(" ", ";").split(";"):
            a = a.strip().replace("+PTX", "")
            if a:
                archs.append(a.replace(".", ""))
        return ";".join(archs)
    return "90a"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        device = _target_device()
        cfg = os.environ.get("SPECRT_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSPECRT_EXT_OUTPUT_DIR={out_dir}",
            f"-DSPECRT_BUILD_TORCH_EXT=ON",
            f"-DSPECRT_CUDA={'ON' if device == 'cuda' else 'OFF'}",
        ]
        if device == "cuda":
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={_cuda_archs()}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", str(ROOT), *args], cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir)


setup(ext_modules=[CMakeExtension("specrt._C")], cmdclass={"build_ext": CMakeBuild})
