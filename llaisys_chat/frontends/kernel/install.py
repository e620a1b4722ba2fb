"""`llaisys-chat kernel install`: register the "LLAISYS chat" kernel with Jupyter."""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from ..options import add_cluster_options, cluster_argv, cluster_options

DEFAULT_NAME = "llaisys-chat"


def kernel_spec(options: dict) -> dict:
    """kernel.json: this Python runs the kernel module with the chosen cluster.connect() options."""
    argv = [sys.executable, "-m", "llaisys_chat.frontends.kernel", "-f", "{connection_file}", *cluster_argv(options)]
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
    add_cluster_options(install)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "kernel.json").write_text(json.dumps(kernel_spec(cluster_options(args)), indent=1))
        prefix = None if args.user else (args.prefix or sys.prefix)
        where = KernelSpecManager().install_kernel_spec(folder, kernel_name=args.name, user=args.user, prefix=prefix)
    print(f"Installed kernel spec {args.name} in {where}")
    return 0
