"""`python -m llaisys_chat.frontends.kernel -f CONNECTION_FILE [--model M] [-n N] [--profile P] [--cluster-id ID]`."""
import argparse
import os
import sys

from ipykernel.kernelapp import IPKernelApp

from ..options import add_cluster_options, cluster_options
from .chat_kernel import ChatKernel

ENVIRONMENT = {"model": "LLAISYS_MODEL", "weights": "LLAISYS_WEIGHTS", "n": "LLAISYS_N", "profile": "LLAISYS_PROFILE",
               "cluster_id": "LLAISYS_CLUSTER_ID"}


def connect_options(argv: list[str]) -> tuple[dict, list[str]]:
    """cluster.connect() options from the kernel spec's arguments, each overridden by its environment
    variable; returns them with the arguments left for ipykernel."""
    parser = argparse.ArgumentParser(add_help=False)
    add_cluster_options(parser)
    args, rest = parser.parse_known_args(argv)
    options = cluster_options(args)
    for key, variable in ENVIRONMENT.items():
        if os.environ.get(variable):
            options[key] = int(os.environ[variable]) if key == "n" else os.environ[variable]
    return options, rest


if __name__ == "__main__":
    ChatKernel.connect_options, remaining = connect_options(sys.argv[1:])
    IPKernelApp.launch_instance(argv=remaining, kernel_class=ChatKernel)
