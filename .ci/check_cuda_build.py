"""CUDA compile check without a GPU: configure and build the extension with the CUDA kernels
against the running interpreter's torch (a CUDA build), then import the .so and check that every
op has a CUDA kernel registered. Nothing runs on a device.

    CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST="8.0;9.0a" LFI_FAST_CUDA=1 \
        .venv-cuda/bin/python .ci/check_cuda_build.py --build-dir build/check-cuda
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default="build/check-cuda")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    import torch

    if not torch.version.cuda:
        print(f"check-cuda needs a CUDA build of torch (got {torch.__version__})", file=sys.stderr)
        return 1
    build = (ROOT / args.build_dir).resolve()
    out = build / "out"
    bindir = Path(sys.executable).parent
    env = dict(os.environ, LFI_FAST_CUDA="1", PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cmake = shutil.which("cmake", path=env["PATH"]) or "cmake"
    configure = [
        cmake, "-S", str(ROOT), "-B", str(build), "-GNinja",
        f"-DPython_EXECUTABLE={sys.executable}",
        "-DLFI_FAST_FROM_SETUP=ON",  # leave lfi_fast/ alone: this .so is for checking only
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}",
    ]
    t0 = time.time()
    subprocess.run(configure, check=True, env=env)
    subprocess.run([cmake, "--build", str(build), "-j", str(args.jobs)], check=True, env=env)
    print(f"built in {time.time() - t0:.0f} s")

    (so,) = glob.glob(str(out / "_C*.so"))
    spec = importlib.util.spec_from_file_location("lfi_fast._C", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    info = mod.build_info()
    print("build_info:", dict(info))
    if not info["cuda"]:
        print("the extension was built without CUDA", file=sys.stderr)
        return 1
    missing = []
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("lfi_fast::"):
            for key in ("CPU", "CUDA"):
                if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
                    missing.append(f"{name} [{key}]")
    if missing:
        print("ops without a kernel: " + ", ".join(missing), file=sys.stderr)
        return 1
    print(f"check-cuda: OK ({so}, archs {info['cuda_archs']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
