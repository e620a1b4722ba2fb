"""llama.cpp, the speed reference: built from the llama-cpp-python source distribution's vendored copy.

Nothing of llama.cpp is committed: the source is downloaded from PyPI and built (about 10 minutes on
two cores) under $LLAISYS_HOME/llama.cpp the first time a benchmark needs it.

On a CPU with AMX there are two builds, by g++ and by clang, and llama-bench's figure is the faster
working one per test: g++ 12 drops the stores that fill AMX's tile configuration (its ldtilecfg
intrinsic is not seen to read them), so the g++ build's AMX prompt kernels die (SIGILL or SIGSEGV:
llama-bench's prefill, llama-perplexity), while its decode ran 1.6-1.8x the clang build's (Q8_0,
2026-12-05). The other programs use the clang build there.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from urllib.request import Request, urlopen

from llaisys_chat.model.cache import cache_home, exclusive

VERSION = "0.3.36"
COMPILER_ENV = {"g++": {}, "clang": {"CC": "clang", "CXX": "clang++"}}


def llama_bin(name: str, compiler: str | None = None) -> Path:
    """Path of a llama.cpp program (llama-bench, llama-quantize, llama-perplexity), building llama.cpp if needed:
    that of `compiler`'s build, by default the build whose every kernel runs on this CPU."""
    compiler = compiler or _compilers()[-1]
    root = cache_home() / "llama.cpp" / VERSION
    build = root / ("build" if compiler == "g++" else f"build-{compiler}")
    binary = build / "bin" / name
    if not binary.exists():
        with exclusive(root):
            if not binary.exists():
                _build(root, build, COMPILER_ENV[compiler])
    return binary


def _compilers() -> list[str]:
    """The builds llama-bench runs: g++, and clang too where the CPU has AMX (module docstring); the last
    is the one whose every kernel runs here."""
    if "amx_int8" not in Path("/proc/cpuinfo").read_text():
        return ["g++"]
    if not shutil.which("clang++"):
        sys.exit("bench: this CPU has AMX, whose llama.cpp kernels g++ 12 miscompiles: install clang (apt install clang)")
    return ["g++", "clang"]


def _build(root: Path, build: Path, compiler_env: dict) -> None:
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
    print(f"bench: building llama.cpp (llama-bench, llama-quantize, llama-perplexity) in {build}...", file=sys.stderr)
    env = {**os.environ, **compiler_env}
    subprocess.run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True, stdout=subprocess.DEVNULL, env=env)
    subprocess.run(["cmake", "--build", build, "-j", "2", "--target", "llama-bench", "llama-quantize", "llama-perplexity"], check=True,
                   stdout=subprocess.DEVNULL, env=env)


def same_weights_gguf(source_gguf: Path, kind: str = "BF16") -> Path:
    """A GGUF (a built-in's) re-encoded as `kind` (BF16, F32, Q8_0, ...) by llama-quantize, cached."""
    out = cache_home() / "llama.cpp" / f"{source_gguf.stem}-{kind.lower()}.gguf"
    if not out.exists():
        tmp = out.with_suffix(".partial")
        subprocess.run([llama_bin("llama-quantize"), "--allow-requantize", source_gguf, tmp, kind], check=True,
                       capture_output=True)
        tmp.rename(out)
    return out


def llama_bench(gguf: Path, threads: list[int], prompt: int = 128, generate: int = 128, repetitions: int = 3,
                depth: int = 0) -> dict:
    """{(test, threads): tokens/s} from llama-bench, test being 'prefill' or 'decode' (after `depth` tokens
    of context): the fastest build's figure per test, where a CPU has more than one build (module docstring),
    and after a context the faster of flash attention on and off (on, its default, was the slower here)."""
    speeds = {}
    for compiler in _compilers():
        result = subprocess.run([llama_bin("llama-bench", compiler), "-m", gguf, "-p", str(prompt), "-n", str(generate),
                                 "-t", ",".join(map(str, threads)), "-r", str(repetitions), "-d", str(depth),
                                 *(["-fa", "0,1"] if depth else []), "-o", "json"],
                                capture_output=True, text=True)
        if result.returncode < 0:  # killed by a signal: this build cannot run the test here
            continue
        result.check_returncode()
        for row in json.loads(result.stdout):
            key = ("prefill" if row["n_prompt"] > 0 else "decode", row["n_threads"])
            speeds[key] = max(speeds.get(key, 0.0), row["avg_ts"])
    if not speeds:
        sys.exit(f"bench: every llama.cpp build crashed on {gguf.name}")
    return speeds
