"""The native code under AddressSanitizer and UndefinedBehaviorSanitizer: the extension is built with
LLAISYS_SANITIZE=1 into a scratch copy of the package, and the op, quantization and model tests run
against it with the sanitizer runtime preloaded. Any report fails the run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def sanitized_package(tmp_path_factory):
    """A folder holding llaisys_chat with its extension built under the sanitizers."""
    root = tmp_path_factory.mktemp("sanitized")
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", root / "lib", "--build-temp",
                            root / "obj"], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                           env={**os.environ, "LLAISYS_SANITIZE": "1"})
    assert build.returncode == 0, build.stderr[-3000:]
    package = root / "lib" / "llaisys_chat"
    shutil.copytree(ROOT / "llaisys_chat", package, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("_native*.so", "__pycache__"))
    return root / "lib"


def runtime(name: str) -> str:
    return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()


def test_ops_quantization_and_model_run_clean_under_asan_and_ubsan(sanitized_package):
    env = {**os.environ, "PYTHONPATH": str(sanitized_package), "LD_PRELOAD": f"{runtime('libasan.so')} {runtime('libubsan.so')}",
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
           "OMP_NUM_THREADS": "2"}
    code = "import llaisys_chat._native as n, sys; print(n.__file__)"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=sanitized_package)
    assert where.returncode == 0 and where.stdout.startswith(str(sanitized_package)), where.stderr[-2000:]
    linked = subprocess.run(["ldd", where.stdout.strip()], capture_output=True, text=True).stdout
    assert "libasan" in linked and "libubsan" in linked  # instrumented, not a plain build
    tests = [str(ROOT / "tests" / name) for name in ("test_ops.py", "test_quant.py", "test_model.py")]
    # Run from the scratch folder: `python -m` puts the working folder first on the import path.
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *tests],
                            cwd=sanitized_package, capture_output=True, text=True, env=env, timeout=1800)
    report = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in report and "runtime error:" not in report
