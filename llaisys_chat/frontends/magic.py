"""`%%llaisys` and `%llaisys`: chat with the cluster's model from IPython and Jupyter.

    %load_ext llaisys_chat
    %%llaisys --temperature 0.2
    Explain {topic} in two sentences.

A cell is the user's turn in a named conversation (a Session, as in the REPL). The reply streams
into the cell's output as it is generated and, once complete, is shown as Markdown. Interrupting the
kernel stops the reply on every rank and keeps what was written.
"""
import shlex
import string

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.display import Markdown, clear_output, display

from .. import cluster
from ..client.ranks import counted
from ..errors import LlaisysError
from ..protocol.messages import reply_markdown
from .commands import Commands
from .options import (
    add_cluster_options,
    add_sampling_options,
    cluster_options,
    sampling_options,
)
from .streaming import context_notice, stream_reply

DEFAULT_SESSION = "default"
LINE_USAGE = ("%llaisys connect [options] | model M | [--session NAME] COMMAND [ARGS], where COMMAND is any of the "
              "REPL's /commands without the slash (reset, history, stats, save FILE, load FILE, set, show, ...)")


def _cell_parser() -> MagicArgumentParser:
    p = MagicArgumentParser(prog="%%llaisys", description="Send the cell to the model as the next message.")
    p.add_argument("--system", help="set this conversation's system prompt (default: keep it)")
    add_sampling_options(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--session", default=DEFAULT_SESSION, help="the conversation to continue (default: 'default')")
    which.add_argument("--new", action="store_true", help="start the conversation afresh")
    p.add_argument("--out", default="_llaisys", help="variable that receives the reply (default: _llaisys)")
    p.add_argument("--raw", action="store_true", help="keep the plain text instead of rendering Markdown")
    return p


def _connect_parser() -> MagicArgumentParser:
    p = MagicArgumentParser(prog="%llaisys connect", description="Connect to (or start) a cluster.")
    add_cluster_options(p)
    return p


def _session_parser() -> MagicArgumentParser:
    p = MagicArgumentParser(prog="%llaisys", usage=LINE_USAGE, add_help=False)
    p.add_argument("--session", default=DEFAULT_SESSION)
    return p


CELL_PARSER, CONNECT_PARSER, SESSION_PARSER = _cell_parser(), _connect_parser(), _session_parser()


def expand(text: str, global_ns: dict, local_ns: dict) -> str:
    """Replace {expression} with its value, f-string style ({{ and }} stay literal braces)."""
    parts = []
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as e:
        raise UsageError(f"cannot expand the cell: {e} (write {{{{ and }}}} for literal braces)") from None
    for literal, field, spec, conversion in fields:
        parts.append(literal)
        if field is None:
            continue
        try:
            value = eval(field, global_ns, local_ns)
        except Exception as e:
            raise UsageError(f"cannot expand {{{field}}}: {type(e).__name__}: {e}") from None
        if conversion:
            value = {"r": repr, "s": str, "a": ascii}[conversion](value)
        parts.append(format(value, spec))
    return "".join(parts)


class NotebookChat:
    """The notebook's connection and its named conversations."""

    def __init__(self):
        self.client = None
        self.sessions = {}

    def connect(self, **options):
        """Connect (again) to a cluster (cluster.connect()'s options); conversations carry over."""
        if self.client is not None:
            self.client.close()
            self.client = None
        self.client = cluster.connect(**options)
        for name, old in self.sessions.items():
            self.sessions[name] = self.client.session()
            self.sessions[name].restore(old.state())
        return self.client

    def ensure_client(self):
        """The client, connecting to (or starting) the default cluster on first use."""
        return self.client or self.connect()

    def session(self, name: str, new: bool = False):
        """The conversation called name, made (or made afresh) when needed."""
        if new or name not in self.sessions:
            self.sessions[name] = self.ensure_client().session()
        return self.sessions[name]


@magics_class
class LlaisysMagics(Magics):
    """%llaisys (line: connection and conversations) and %%llaisys (cell: a message)."""

    def __init__(self, shell):
        super().__init__(shell)
        self.chat = NotebookChat()

    @line_cell_magic
    def llaisys(self, line, cell=None):
        """%llaisys connect|model|reset|history|stats|save|load|... , or %%llaisys [options] + a message."""
        try:
            return self._line(line) if cell is None else self._cell(line, cell)
        except LlaisysError as e:
            raise UsageError(str(e)) from None

    def _cell(self, line, cell):
        args = CELL_PARSER.parse_args(_words(line))
        text = expand(cell, self.shell.user_global_ns, self.shell.user_ns).strip()
        if not text:
            raise UsageError("the cell is empty: write the message below %%llaisys")
        session = self.chat.session(args.session, new=args.new)
        if args.system is not None:
            session.system = args.system
        self._show_reply(session.send(text, stream=True, **sampling_options(args)), args.out, args.raw)

    def _show_reply(self, stream, out: str = "_llaisys", raw: bool = False) -> None:
        """Stream a reply into the cell's output, then show it as Markdown and store it in `out`."""
        stopped = stream_reply(stream, lambda piece: print(piece, end="", flush=True))
        reply = stream.reply
        if reply is None:  # stopped before the engines had started
            print("[stopped]")
            return
        self.shell.user_ns[out] = reply
        if not raw and _in_kernel(self.shell):
            clear_output(wait=True)
            display(Markdown(reply_markdown(reply.text)))
        else:
            print()
        if stopped:
            print("[stopped]")
        if context_notice(reply):
            print(context_notice(reply))

    def _line(self, line):
        words = _words(line)
        if words[:1] == ["connect"]:
            client = self.chat.connect(**cluster_options(CONNECT_PARSER.parse_args(words[1:])))
            info = client.info()
            print(f"Connected: {info['model']} on {counted(info['ranks'], 'rank')}, {info['max_context']} tokens of context")
            return
        client = self.chat.ensure_client()
        if words[:1] == ["model"] and len(words) == 2:
            client.load(words[1])
            print(f"Loaded {words[1]} on {counted(client.n_ranks, 'rank')}")
            return
        args, command = SESSION_PARSER.parse_known_args(words)
        if not command:
            raise UsageError(f"usage: {LINE_USAGE}")
        session = self.chat.session(args.session)
        result = Commands(session, client).run(shlex.join(["/" + command[0].lstrip("/"), *command[1:]]))
        if result.text:
            print(result.text)
        if result.regenerate:
            self._show_reply(session.regenerate(stream=True))


def _words(line: str) -> list[str]:
    """The line split the way a shell splits it (IPython's own splitting keeps the quotes)."""
    try:
        return shlex.split(line)
    except ValueError as e:
        raise UsageError(f"cannot parse the options: {e}") from None


def _in_kernel(shell) -> bool:
    """Whether outputs go to a Jupyter front end (which renders Markdown), not a terminal."""
    return getattr(shell, "kernel", None) is not None
