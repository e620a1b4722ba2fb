"""The package's layers, as the README's layout section lists them: each imports only the layers
below it, and importing the client or a front end never loads the engine or the native extension."""
import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "llaisys_chat"
README = Path(__file__).parent.parent / "README.md"

# Top to bottom. A module may import modules of its own layer and of every layer below it; client
# and engine sit side by side and never import each other (they meet only in protocol/).
LAYERS = [
    ("front ends", ["llaisys_chat", "llaisys_chat.repl", "llaisys_chat.cluster", "llaisys_chat.generate",
                    "llaisys_chat.frontends"]),
    ("client", ["llaisys_chat.client"]),
    ("engine", ["llaisys_chat.engine"]),
    ("model files", ["llaisys_chat.model"]),
    ("protocol", ["llaisys_chat.protocol"]),
    ("errors", ["llaisys_chat.errors"]),
    ("native", ["llaisys_chat._native"]),
]
SIDE_BY_SIDE = {"client", "engine"}
NATIVE_USERS = {"engine"}


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific prefix naming this module."""
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer: add it to LAYERS and to the README's layout"
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def imports_of(path: Path) -> set[str]:
    """Every llaisys_chat module a file imports (relative imports resolved), at any depth in the file."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("llaisys_chat")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("llaisys_chat"):  # `from package import name` may name a module
                found |= {f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names}
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_import_goes_down_the_layers(path):
    here = layer_of(module_name(path))
    for target in imports_of(path):
        there = layer_of(target)
        names = (LAYERS[here][0], LAYERS[there][0])
        assert there >= here, f"{module_name(path)} ({names[0]}) imports {target}, a higher layer ({names[1]})"
        assert not (there != here and set(names) == SIDE_BY_SIDE), f"{module_name(path)} imports {target} across {names}"
        if names[1] == "native":
            assert names[0] in NATIVE_USERS, f"{module_name(path)} ({names[0]}) loads the native extension"


def test_the_readme_layout_names_the_same_layers():
    layout = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert subpackages == ["client", "engine", "frontends", "model", "protocol"], "a new subpackage needs a layer"
    for name, _ in LAYERS:
        assert name in layout, f"the README's layout does not name the {name} layer"
    for folder in subpackages:
        assert f"{folder}/" in layout, f"the README's layout does not show {folder}/"


def test_the_client_and_front_ends_do_not_load_the_engine():
    code = ("import sys\n"
            "import llaisys_chat.cluster, llaisys_chat.repl, llaisys_chat.frontends.magic\n"
            "import llaisys_chat.frontends.kernel.chat_kernel, llaisys_chat.frontends.kernel.install\n"
            "print(sorted(m for m in sys.modules if m.startswith(('llaisys_chat.engine', 'llaisys_chat._native'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
