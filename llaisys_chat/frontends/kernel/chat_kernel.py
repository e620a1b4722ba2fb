"""The "LLAISYS chat" kernel: each executed cell is the user's turn; lines starting with / are the
REPL's commands (commands.py). Replies stream as stream messages, then show as Markdown.

Settings come from the kernel spec's command line (--model, -n, --profile, --cluster-id), each
overridable by an environment variable (LLAISYS_MODEL, LLAISYS_N, LLAISYS_PROFILE,
LLAISYS_CLUSTER_ID). The cluster is found (or started) on the first cell, as the REPL does; a
restarted kernel finds the model already loaded on a running cluster.
"""
from ipykernel.kernelbase import Kernel
from prompt_toolkit.document import Document

from ... import __version__, cluster
from ...errors import LlaisysError
from ...protocol.messages import reply_markdown
from ..commands import CommandCompleter, Commands
from ..streaming import context_notice, stream_reply


class ChatKernel(Kernel):
    """Every cell is a message to the model; /commands change the conversation and settings."""

    implementation = "llaisys-chat"
    implementation_version = __version__
    language_info = {"name": "markdown", "mimetype": "text/markdown", "file_extension": ".md"}
    banner = "LLAISYS chat: each cell is your next message; /help lists the commands."
    connect_options: dict = {}  # set by __main__ from the kernel spec and the environment

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._client = None
        self._session = None
        self._commands = None

    async def do_execute(self, code, silent, store_history=True, user_expressions=None, allow_stdin=False, **_):
        """Run leading /command lines, then send the rest of the cell as the message."""
        lines = code.strip().splitlines()
        commands = []
        while lines and lines[0].lstrip().startswith("/"):
            commands.append(lines.pop(0).strip())
        message = "\n".join(lines).strip()
        try:
            self._connect()
            for line in commands:
                result = self._commands.run(line)
                if result.text:
                    self._stream(result.text + "\n")
                if result.regenerate:
                    self._reply(self._session.regenerate(stream=True), silent)
            if message:
                self._reply(self._session.send(message, stream=True), silent)
        except (LlaisysError, KeyboardInterrupt) as e:  # a one-line error; the kernel lives on
            message = str(e) if isinstance(e, LlaisysError) else "interrupted"
            self._stream(f"error: {message}\n", name="stderr")
            return {"status": "error", "ename": type(e).__name__, "evalue": message, "traceback": [f"error: {message}"],
                    "execution_count": self.execution_count}
        return {"status": "ok", "execution_count": self.execution_count, "payload": [], "user_expressions": {}}

    def _reply(self, stream, silent: bool) -> None:
        """Stream a reply; when complete, replace the stream with its Markdown as the execute_result."""
        # The notebook's stop button interrupts the kernel: every rank stops, the text so far stays.
        stopped = stream_reply(stream, (lambda piece: None) if silent else self._stream)
        reply = stream.reply
        if silent or reply is None:
            return
        if context_notice(reply):
            self._stream(context_notice(reply) + "\n", name="stderr")
        self.send_response(self.iopub_socket, "clear_output", {"wait": True})
        self.send_response(self.iopub_socket, "execute_result", {
            "execution_count": self.execution_count, "metadata": {},
            "data": {"text/markdown": reply_markdown(reply.text) + ("\n\n*[stopped]*" if stopped else ""),
                     "text/plain": reply.text}})

    def _stream(self, text: str, name: str = "stdout") -> None:
        self.send_response(self.iopub_socket, "stream", {"name": name, "text": text})

    def _connect(self) -> None:
        """Connect on first use, as the REPL does (its progress messages go to the kernel's log)."""
        if self._client is None:
            self._client = cluster.connect(**self.connect_options)
            self._session = self._client.session()
            self._commands = Commands(self._session, self._client)

    async def do_complete(self, code, cursor_pos):
        """Slash commands, /set parameters, /think modes and /save, /load paths."""
        line_start = code.rfind("\n", 0, cursor_pos) + 1
        line = code[line_start:cursor_pos]
        completions = list(CommandCompleter().get_completions(Document(line), None))
        start = cursor_pos + (completions[0].start_position if completions else 0)
        return {"matches": [c.text for c in completions], "cursor_start": start, "cursor_end": cursor_pos,
                "metadata": {}, "status": "ok"}

    async def do_is_complete(self, code):
        """Every cell is a complete message."""
        return {"status": "complete"}

    async def do_shutdown(self, restart):
        """Close the client (it stops the cluster only if it started it)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        return {"status": "ok", "restart": restart}
