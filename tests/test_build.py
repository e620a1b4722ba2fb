"""The portable build (LLAISYS_PORTABLE=1: AVX2 + FMA, no AVX-512) compiles and passes the engine tests."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_portable_build_passes_the_op_and_model_tests(tmp_path):
    for name in ("native", "tests"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "llaisys_chat", tmp_path / "llaisys_chat", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = {**os.environ, "LLAISYS_PORTABLE": "1", "LLAISYS_BUILD_JOBS": "2"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    info = subprocess.run([sys.executable, "-c", "import llaisys_chat._native as n; i = n.build_info(); print(i['isa'], i['amx'])"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert info.stdout.split() == ["avx2", "none"], info.stderr  # AMX kernels come with AVX-512 builds only
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops.py",
                            "tests/test_model.py"], cwd=tmp_path, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-3000:]
