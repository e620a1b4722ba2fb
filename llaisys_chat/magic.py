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

from . import cluster
from .commands import format_stats, sampling_from_args
from .errors import LlaisysError
from .messages import reply_markdown

DEFAULT_SESSION = "default"


def _cell_parser() -> MagicArgumentParser:
    p = MagicArgumentParser(prog="%%llaisys", description="Send the cell to the model as the next message.")
    p.add_argument("--system", help="set this conversation's system prompt")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--seed", type=int)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--session", default=DEFAULT_SESSION, help="the conversation to continue (default: 'default')")
    which.add_argument("--new", action="store_true", help="start the conversation afresh")
    p.add_argument("--out", default="_llaisys", help="variable that receives the reply (default: _llaisys)")
    p.add_argument("--raw", action="store_true", help="keep the plain text instead of rendering Markdown")
    return p


def _line_parser() -> MagicArgumentParser:
    p = MagicArgumentParser(prog="%llaisys", description="Manage the connection and the conversations.")
    commands = p.add_subparsers(dest="command", required=True, parser_class=MagicArgumentParser)
    connect = commands.add_parser("connect", help="connect to (or start) a cluster")
    connect.add_argument("--profile")
    connect.add_argument("--cluster-id")
    connect.add_argument("-n", type=int)
    connect.add_argument("--model", default="demo")
    commands.add_parser("model", help="load another model").add_argument("model")
    commands.add_parser("reset", help="forget a conversation").add_argument("--session", default=DEFAULT_SESSION)
    commands.add_parser("history", help="show a conversation").add_argument("--session", default=DEFAULT_SESSION)
    commands.add_parser("stats", help="the last reply's speed").add_argument("--session", default=DEFAULT_SESSION)
    for name in ("save", "load"):
        sub = commands.add_parser(name, help=f"{name} a conversation as JSON")
        sub.add_argument("file")
        sub.add_argument("--session", default=DEFAULT_SESSION)
    return p


CELL_PARSER, LINE_PARSER = _cell_parser(), _line_parser()


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

    def connect(self, model="demo", profile=None, cluster_id=None, n=None):
        """Connect (again) to a cluster; conversations carry over."""
        if self.client is not None:
            self.client.close()
            self.client = None
        self.client = cluster.connect(model, profile=profile, cluster_id=cluster_id, n=n)
        for session in self.sessions.values():
            session.client = self.client
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
        """%llaisys connect|model|reset|history|stats|save|load ..., or %%llaisys [options] + a message."""
        try:
            return self._line(line) if cell is None else self._cell(line, cell)
        except LlaisysError as e:
            raise UsageError(str(e)) from None

    def _cell(self, line, cell):
        args = _parse(CELL_PARSER, line)
        text = expand(cell, self.shell.user_global_ns, self.shell.user_ns).strip()
        if not text:
            raise UsageError("the cell is empty: write the message below %%llaisys")
        session = self.chat.session(args.session, new=args.new)
        if args.system is not None:
            session.system = args.system
        overrides = sampling_from_args(args)
        stopped = False
        stream = session.send(text, stream=True, **overrides)
        try:
            for piece in stream:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stopped = True
        reply = stream.reply
        if reply is None:  # stopped before the engines had started
            print("[stopped]")
            return
        self.shell.user_ns[args.out] = reply
        if not args.raw and _in_kernel(self.shell):
            clear_output(wait=True)
            display(Markdown(reply_markdown(reply.text)))
        else:
            print()
        if stopped:
            print("[stopped]")

    def _line(self, line):
        args = _parse(LINE_PARSER, line)
        if args.command == "connect":
            client = self.chat.connect(args.model, profile=args.profile, cluster_id=args.cluster_id, n=args.n)
            info = client.info()
            print(f"Connected: {info['model']} on {info['ranks']} ranks, {info['max_context']} tokens of context")
            return
        client = self.chat.ensure_client()
        if args.command == "model":
            client.load(args.model)
            print(f"Loaded {args.model} on {client.n_ranks} ranks")
            return
        session = self.chat.session(args.session)
        if args.command == "reset":
            session.reset()
        elif args.command == "history":
            for m in session.prompt_messages():
                print(f"{m['role']}: {m['content']}\n")
        elif args.command == "stats":
            if session.last_reply is None:
                raise UsageError("no reply yet")
            print(format_stats(session.last_reply))
        elif args.command == "save":
            print(f"Saved to {session.save(args.file)}")
        elif args.command == "load":
            session.load(args.file)
            print(f"Loaded {len(session.messages)} messages")


def _parse(parser: MagicArgumentParser, line: str):
    """Options split the way a shell splits them (IPython's own splitting keeps the quotes)."""
    try:
        return parser.parse_args(shlex.split(line))
    except ValueError as e:
        raise UsageError(f"cannot parse the options: {e}") from None


def _in_kernel(shell) -> bool:
    """Whether outputs go to a Jupyter front end (which renders Markdown), not a terminal."""
    return getattr(shell, "kernel", None) is not None
