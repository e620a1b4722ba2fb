"""Command-line options that every front end spells the same way: which model on which cluster, and
how to sample. The REPL, the magic, the chat kernel and llaisys-generate all add them from here."""
from .. import __version__
from ..client.session import CHAT_DEFAULTS
from ..model.builtins import BUILTINS, DEFAULT_MODEL
from ..protocol.request import CONTEXT_POLICIES, MAX_NEW_TOKENS, WEIGHT_TYPES

CHAT_SAMPLING = {**CHAT_DEFAULTS, "max_new_tokens": MAX_NEW_TOKENS}  # what a chat uses when not told otherwise

def add_version_option(parser) -> None:
    """--version: print the package version and exit."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def add_model_options(parser) -> None:
    """--model and --weights: the model to load, and the type its weights are computed in."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a built-in model ({', '.join(m.name for m in BUILTINS)}; 'demo' is the first; "
                             f"`llaisys-chat models` lists them), a .gguf file or a Hugging Face model folder "
                             f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--weights", choices=WEIGHT_TYPES, default="auto",
                        help="the weights' type: auto keeps a GGUF's own types and computes safetensors in bf16 "
                             "(f32 ones in f32); q8_0 and q4_0 quantize when loading (default: auto)")


def add_cluster_options(parser) -> None:
    """--model, --weights, --profile | --cluster-id, -n: which model, on which cluster (cluster.connect()'s arguments)."""
    add_model_options(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--profile", help="ipyparallel profile of the cluster (default: 'default')")
    where.add_argument("--cluster-id", help="ipyparallel cluster id (default: none)")
    parser.add_argument("-n", type=int, metavar="N",
                        help="MPI engines to start when no cluster runs, the cores split among them (default: engines of up to 8 cores, at least 2)")


_CLUSTER_FLAGS = {"model": "--model", "weights": "--weights", "profile": "--profile", "cluster_id": "--cluster-id",
                  "n": "-n"}


def cluster_options(args) -> dict:
    """cluster.connect()'s keyword arguments from options added by add_cluster_options."""
    return {key: getattr(args, key) for key in _CLUSTER_FLAGS}


def cluster_argv(options: dict) -> list[str]:
    """The command-line options that give these cluster.connect() arguments (None ones left out)."""
    return [word for key, value in options.items() if value is not None for word in (_CLUSTER_FLAGS[key], str(value))]


def add_sampling_options(parser, defaults: dict = CHAT_SAMPLING) -> None:
    """--temperature, --top-k, --top-p, --max-tokens, --seed; `defaults` (Session.sampling keys) are
    what applies when an option is not given, shown in the help."""
    parser.add_argument("--temperature", type=float, metavar="T",
                        help=f"randomness of sampling; 0 is greedy (default: {defaults['temperature']})")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help=f"sample among the K most likely tokens; 0 is off (default: {defaults['top_k']})")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help=f"sample among the most likely tokens holding mass P; 1 is off (default: {defaults['top_p']})")
    parser.add_argument("--max-tokens", "--max-new-tokens", dest="max_new_tokens", type=int, metavar="N",
                        help=f"longest reply, in tokens (default: {defaults['max_new_tokens']})")
    parser.add_argument("--seed", type=int, metavar="S", help="seed for repeatable sampling (default: a random one)")
    parser.add_argument("--context", choices=CONTEXT_POLICIES,
                        help="when a conversation outgrows the context: trim lets its oldest messages go (never "
                             "the system prompt), error refuses the message (default: trim)")


def sampling_options(args) -> dict:
    """The sampling options given on the command line, as Session.sampling keys (others left out)."""
    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "max_new_tokens", "seed", "context")}
    return {k: v for k, v in given.items() if v is not None}
