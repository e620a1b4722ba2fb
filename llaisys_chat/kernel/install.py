"""`llaisys-chat kernel install`: register the "LLAISYS chat" kernel with Jupyter."""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

DEFAULT_NAME = "llaisys-chat"


def kernel_spec(model: str | None, n: int | None, profile: str | None, cluster_id: str | None) -> dict:
    """kernel.json: this Python runs the kernel module with the chosen cluster options."""
    argv = [sys.executable, "-m", "llaisys_chat.kernel", "-f", "{connection_file}"]
    for flag, value in (("--model", model), ("-n", n), ("--profile", profile), ("--cluster-id", cluster_id)):
        if value is not None:
            argv += [flag, str(value)]
    return {"argv": argv, "display_name": "LLAISYS chat", "language": "markdown", "interrupt_mode": "signal",
            "metadata": {"debugger": False}}


def main(argv=None) -> int:
    """Entry point of `llaisys-chat kernel ...`."""
    p = argparse.ArgumentParser(prog="llaisys-chat kernel", description="Manage the LLAISYS chat Jupyter kernel.")
    commands = p.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="install the kernel spec")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user only")
    where.add_argument("--prefix", help="under PREFIX/share/jupyter (default: this Python's prefix)")
    install.add_argument("--name", default=DEFAULT_NAME, help=f"kernel name (default {DEFAULT_NAME})")
    install.add_argument("--model", help="model the kernel loads (default: demo)")
    install.add_argument("-n", type=int, help="engines to start when no cluster runs")
    install.add_argument("--profile")
    install.add_argument("--cluster-id")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "kernel.json").write_text(json.dumps(kernel_spec(args.model, args.n, args.profile,
                                                                           args.cluster_id), indent=1))
        prefix = None if args.user else (args.prefix or sys.prefix)
        where = KernelSpecManager().install_kernel_spec(folder, kernel_name=args.name, user=args.user, prefix=prefix)
    print(f"Installed kernel spec {args.name} in {where}")
    return 0
