"""`llaisys-chat`: chat with the cluster's model in the terminal.

A prompt_toolkit loop over one Session: replies stream as they are generated, Ctrl-C stops a reply
on every rank and keeps what was written, slash commands (commands.py) change settings and the
conversation. With standard input not a terminal it reads one message per line and prints plain
replies, so it can be scripted: `echo "Hi" | llaisys-chat`.
"""
import argparse
import os
import signal
import sys
from pathlib import Path

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.formatted_text import HTML, FormattedText
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.styles import Style, merge_styles, style_from_pygments_cls
from pygments.styles import get_style_by_name

from . import cluster
from .client.ranks import counted
from .errors import LlaisysError
from .frontends.commands import CommandCompleter, Commands
from .frontends.options import (
    add_cluster_options,
    add_sampling_options,
    add_version_option,
    cluster_options,
    sampling_options,
)
from .frontends.render import StreamRenderer
from .frontends.streaming import context_notice, stream_reply
from .model.builtins import find_builtin

STYLE = merge_styles([style_from_pygments_cls(get_style_by_name("monokai")), Style.from_dict({
    "bottom-toolbar": "noreverse bg:#303030 fg:#b0b0b0", "prompt": "bold fg:ansigreen", "info": "fg:ansicyan",
    "error": "fg:ansired", "dim": "fg:ansibrightblack"})])


def history_path() -> Path:
    """Where typed messages are remembered across runs ($XDG_DATA_HOME/llaisys-chat/history)."""
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "llaisys-chat" / "history"


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("escape", "enter")  # Alt-Enter arrives as Esc + Enter
    def _new_line(event):
        event.current_buffer.insert_text("\n")

    return bindings


class Repl:
    """The interactive loop: read a message or command, stream the reply, repeat."""

    def __init__(self, client, session, *, input=None, output=None, history=None):
        self.session = session
        self.commands = Commands(session, client)
        self.info = client.info()
        self.last_speed: float | None = None
        self.prompt = PromptSession(history=history or _file_history(), auto_suggest=AutoSuggestFromHistory(),
                                    completer=CommandCompleter(), key_bindings=_key_bindings(),
                                    bottom_toolbar=self._toolbar, style=STYLE, input=input, output=output)
        self.output = self.prompt.app.output

    def run(self) -> None:
        """Chat until /quit or Ctrl-D."""
        self._say(f"llaisys-chat · {self._model_name()} · {counted(self.info['ranks'], 'rank')} · "
                  f"{self.info['max_context']}-token context · /help for help, Ctrl-D to quit", "class:info")
        while True:
            try:
                text = self._read()
            except KeyboardInterrupt:
                self._say("(Ctrl-D or /quit leaves)", "class:dim")
                continue
            except EOFError:
                return
            if not text.strip():
                continue
            if text.lstrip().startswith("/"):
                if self._command(text.strip()):
                    return
            else:
                self._reply(lambda: self.session.send(text, stream=True))

    def _read(self) -> str:
        """One message: a line, a line with Alt-Enter breaks, or a block between \"\"\" lines."""
        text = self.prompt.prompt([("class:prompt", ">>> ")])
        if not text.lstrip().startswith('"""'):
            return text
        first = text.lstrip()[3:]
        if first.rstrip().endswith('"""'):  # \"\"\"all on one line\"\"\"
            return first.rstrip()[:-3]
        lines = [first]
        while True:
            line = self.prompt.prompt([("class:prompt", "... ")])
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)

    def _command(self, line: str) -> bool:
        """Run a slash command; True when it asks to quit."""
        try:
            result = self.commands.run(line)
        except LlaisysError as e:
            self._say(f"error: {e}", "class:error")
            return False
        except KeyboardInterrupt:
            self._say("(interrupted)", "class:dim")
            return False
        if result.text:
            self._say(result.text, "class:info")
        if result.regenerate:
            self._reply(self.session.regenerate, stream=True)
        return result.quit

    def _reply(self, start, **kwargs) -> None:
        """Stream one reply; Ctrl-C stops it on every rank and keeps what was written."""
        renderer = StreamRenderer(self._write, show_thinking=self.commands.show_thinking)
        try:
            stream = start(**kwargs)
            stopped = stream_reply(stream, renderer.feed)
            renderer.finish()
            if stopped:
                self._say("\n[stopped]", "class:dim")
            else:
                self._write(FormattedText([("", "\n")]))
            notice = context_notice(stream.reply)
            if notice:
                self._say(notice, "class:dim")
        except KeyboardInterrupt:  # before the reply began
            renderer.finish()
            self._say("\n[stopped]", "class:dim")
        except LlaisysError as e:
            renderer.finish()
            self._say(f"\nerror: {e}", "class:error")
        reply = self.session.last_reply
        if reply is not None:
            self.last_speed = reply.stats.decode_tokens_per_s

    def _toolbar(self):
        speed = f" · {self.last_speed:.1f} tok/s" if self.last_speed else ""
        return HTML(f" {self._model_name()} · {counted(self.info['ranks'], 'rank')} · "
                    f"{self.commands.context_used()}/{self.info['max_context']} tokens{speed} · /help ")

    def _model_name(self) -> str:
        builtin = find_builtin(self.info["model"])
        return builtin.name if builtin else self.info["model"]  # "demo" shows as the model it stands for

    def _write(self, formatted) -> None:
        print_formatted_text(formatted, end="", style=STYLE, output=self.output)

    def _say(self, text: str, style: str = "") -> None:
        print_formatted_text(FormattedText([(style, text)]), style=STYLE, output=self.output)


def run_plain(client, session, lines, out, err=sys.stderr) -> int:
    """Standard input is not a terminal: one message (or /command) per line, plain replies."""
    commands = Commands(session, client)
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        try:
            if text.lstrip().startswith("/"):
                result = commands.run(text.strip())
                if result.text:
                    print(result.text, file=out, flush=True)
                if result.quit:
                    return 0
                if not result.regenerate:
                    continue
                stream = session.regenerate(stream=True)
            else:
                stream = session.send(text, stream=True)
            for piece in stream:
                out.write(piece)
                out.flush()
            out.write("\n")
            notice = context_notice(stream.reply)
            if notice:
                print(notice, file=err, flush=True)
        except LlaisysError as e:
            print(f"llaisys-chat: error: {e}", file=err, flush=True)
    return 0


def _file_history():
    path = history_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileHistory(str(path))


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="llaisys-chat", description="Chat with a model split over MPI ranks.",
                                epilog="`llaisys-chat models` lists the built-in models; `llaisys-chat kernel install` "
                                       "installs the Jupyter chat kernel; `llaisys-chat serve` serves the model "
                                       "over an OpenAI-compatible HTTP API.")
    add_version_option(p)
    add_cluster_options(p)
    p.add_argument("--system", help="system prompt (default: the model's own)")
    add_sampling_options(p)
    return p


def main(argv=None) -> int:
    """Entry point of llaisys-chat."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["kernel"]:
        from .frontends.kernel.install import main as kernel_main
        return kernel_main(argv[1:])
    if argv[:1] == ["serve"]:
        from .frontends.serve import main as serve_main
        return serve_main(argv[1:])
    if argv[:1] == ["models"]:
        from .frontends.models import main as models_main
        return models_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        client = cluster.connect(**cluster_options(args))
    except LlaisysError as e:
        print(f"llaisys-chat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llaisys-chat: interrupted", file=sys.stderr)
        return 130
    # A closed terminal (SIGHUP) or a kill (SIGTERM) still closes the client, which stops the
    # cluster if this process started it.
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    try:
        session = client.session(system=args.system, **sampling_options(args))
        if sys.stdin.isatty() and sys.stdout.isatty():
            Repl(client, session).run()
            return 0
        return run_plain(client, session, sys.stdin, sys.stdout)
    except LlaisysError as e:
        print(f"llaisys-chat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
