"""Build of lfi_fast: setup.py drives CMakeLists.txt (the one build definition), as vLLM does.

    pip install --no-build-isolation -e .     # editable, for development
    pip install --no-build-isolation .        # regular install; also: python -m build --no-isolation

Environment: LFI_FAST_CUDA=0|1 (default: CUDA when torch has it and nvcc is found),
TORCH_CUDA_ARCH_LIST, MAX_JOBS (parallel compile jobs), CMAKE_BUILD_TYPE (default Release).
Build isolation would install a second (5 GB CUDA) torch into a temporary environment: the
extension must be compiled against the torch it will run with, so build without isolation.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A persistent build folder per Python/torch, so that rebuilding is incremental.
        import torch

        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
        build_dir = ROOT / "build" / f"setup-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_file.parent}",
            "-DLFI_FAST_FROM_SETUP=ON",
        ]
        if shutil.which("ninja") or _has_module("ninja"):
            args.append("-GNinja")
            if not shutil.which("ninja"):
                import ninja

                args.append(f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}")
        cmake = shutil.which("cmake") or "cmake"
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--config", cfg, "-j", jobs], check=True)
        built = sorted(out_file.parent.glob("_C*.so"))
        if not built:
            raise RuntimeError(f"CMake did not produce _C in {out_file.parent}")


class SDist(sdist):
    """The sdist carries what CMake builds from: csrc/ and CMakeLists.txt (kernels/ is a package)."""

    def make_release_tree(self, base_dir: str, files) -> None:
        super().make_release_tree(base_dir, files)
        extra = ["CMakeLists.txt", "LICENSE", "README.md"]
        extra += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").rglob("*")) if p.is_file()]
        for rel in extra:
            dest = Path(base_dir) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest)


def _has_module(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


setup(
    ext_modules=[CMakeExtension("lfi_fast._C")],
    cmdclass={"build_ext": CMakeBuild, "sdist": SDist},
)
