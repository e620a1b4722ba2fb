"""llama.cpp, the speed reference: built from the llama-cpp-python source distribution's vendored copy.

Nothing of llama.cpp is committed: the source is downloaded from PyPI and built (about 10 minutes on
two cores) under $LLAISYS_HOME/llama.cpp the first time a benchmark needs it.
"""
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from urllib.request import Request, urlopen

from llaisys_chat.model.cache import cache_home, exclusive

VERSION = "0.3.36"


def llama_bin(name: str) -> Path:
    """Path of a llama.cpp program (llama-bench, llama-quantize, llama-perplexity), building llama.cpp if needed."""
    root = cache_home() / "llama.cpp" / VERSION
    binary = root / "build" / "bin" / name
    if not binary.exists():
        with exclusive(root):
            if not binary.exists():
                _build(root)
    return binary


def _build(root: Path) -> None:
    source = root / "src"
    if not source.exists():
        with tempfile.TemporaryDirectory() as tmp:
            print(f"bench: downloading llama-cpp-python {VERSION} source from PyPI...", file=sys.stderr)
            # The source archive itself: pip would first build the package's metadata (and its build tools).
            index = Request("https://pypi.org/simple/llama-cpp-python/",
                            headers={"Accept": "application/vnd.pypi.simple.v1+json"})
            files = json.load(urlopen(index))["files"]
            sdist = next(f["url"] for f in files if f["filename"] == f"llama_cpp_python-{VERSION}.tar.gz")
            archive = Path(tmp) / "source.tar.gz"
            with urlopen(sdist) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            root.mkdir(parents=True, exist_ok=True)
            shutil.move(next(Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp", source)
    print("bench: building llama.cpp (llama-bench, llama-quantize, llama-perplexity)...", file=sys.stderr)
    build = root / "build"
    subprocess.run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build, "-j", "2", "--target", "llama-bench", "llama-quantize", "llama-perplexity"], check=True,
                   stdout=subprocess.DEVNULL)


def same_weights_gguf(source_gguf: Path, kind: str = "BF16") -> Path:
    """The demo GGUF re-encoded as `kind` (BF16, F32, Q8_0, ...) by llama-quantize, cached."""
    out = cache_home() / "llama.cpp" / f"{source_gguf.stem}-{kind.lower()}.gguf"
    if not out.exists():
        tmp = out.with_suffix(".partial")
        subprocess.run([llama_bin("llama-quantize"), "--allow-requantize", source_gguf, tmp, kind], check=True,
                       capture_output=True)
        tmp.rename(out)
    return out


def llama_bench(gguf: Path, threads: list[int], prompt: int = 128, generate: int = 128, repetitions: int = 3) -> dict:
    """{(test, threads): tokens/s} from llama-bench, test being 'prefill' or 'decode'."""
    result = subprocess.run([llama_bin("llama-bench"), "-m", gguf, "-p", str(prompt), "-n", str(generate),
                             "-t", ",".join(map(str, threads)), "-r", str(repetitions), "-o", "json"],
                            check=True, capture_output=True, text=True)
    speeds = {}
    for row in json.loads(result.stdout):
        test = "prefill" if row["n_prompt"] > 0 else "decode"
        speeds[(test, row["n_threads"])] = row["avg_ts"]
    return speeds
