"""`llaisys-generate`: one reply from the command line (or `generate()` from Python).

Runs in one process, or tensor-parallel under `mpiexec -n N llaisys-generate ...` (rank 0 prints).
"""
import argparse
import json
import sys
from pathlib import Path

from .engine.collectives import default_group
from .engine.engine import Engine
from .errors import LlaisysError
from .frontends.options import (
    add_model_options,
    add_sampling_options,
    add_version_option,
    sampling_options,
)
from .protocol.messages import build_messages
from .protocol.reply import Reply
from .protocol.sampling import SamplingParams

GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 256, "context": "trim"}


def generate(prompt: str | None = None, *, messages: list | None = None, system: str | None = None,
             engine: Engine | None = None, model: str = "demo", max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop: tuple[str, ...] = (), context: str = "trim", on_text=None) -> Reply:
    """Generate one reply in this process (or this MPI rank, as part of a group).

    `engine` reuses a loaded Engine; otherwise `model` ('demo', a .gguf or a folder) is loaded.
    `on_text(piece)` is called with each text piece as it is produced.
    """
    engine = engine or Engine(model)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    run = engine.reply(build_messages(prompt, system, messages), params, max_new_tokens=max_new_tokens,
                       context=context, stop=stop)
    for _, piece in run:
        if piece and on_text:
            on_text(piece)
    return Reply(run.text, run.prompt_ids, run.tokens, run.stats)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="llaisys-generate", description="Generate one chat reply (tensor-parallel under mpiexec).")
    add_version_option(p)
    add_model_options(p)
    p.add_argument("--prompt", help="the user's message")
    p.add_argument("--system", help="system prompt (default: the model's own)")
    p.add_argument("--messages", type=Path, help="JSON file with a list of {role, content} messages to continue")
    add_sampling_options(p, GREEDY)
    p.add_argument("--threads", type=int, help="threads per process (default: cores / local ranks)")
    p.add_argument("--max-context", type=int, help="cache size in tokens (default: min(model context, 8192))")
    p.add_argument("--reduction", choices=("exact", "fast"), default="exact",
                   help="exact: same tokens for any rank count; fast: plain f32 all-reduce (default: exact)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


def main(argv=None) -> int:
    """Entry point of llaisys-generate."""
    args = parser().parse_args(argv)
    group = default_group()
    is_printer = group.rank == 0
    try:
        messages = None
        if args.messages is not None:
            try:
                messages = json.loads(args.messages.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise LlaisysError(f"{args.messages}: cannot read messages ({e})") from None
        engine = Engine(args.model, group=group, threads=args.threads, max_context=args.max_context,
                        weights=args.weights, reduction=args.reduction)
        stream = None if args.json or not is_printer else lambda piece: print(piece, end="", flush=True)
        reply = generate(args.prompt, messages=messages, system=args.system, engine=engine, on_text=stream,
                         **{**GREEDY, **sampling_options(args)})
    except LlaisysError as e:
        if is_printer:
            print(f"llaisys-generate: error: {e}", file=sys.stderr)
        return 1
    if is_printer:
        if args.json:
            print(json.dumps({**reply.to_dict(), "ranks": group.size, "threads": engine.threads}))
        else:
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
