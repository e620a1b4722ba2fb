"""Streaming a reply to wherever a front end shows it, with Ctrl-C (or a notebook's stop button) as
the way to stop it."""
from ..client.ranks import counted


def stream_reply(stream, show) -> bool:
    """Pass each piece of a reply to show() as it arrives; Ctrl-C stops the reply on every rank at
    the same step. Returns whether it was stopped; `stream.reply` then holds what was said (None if
    the engines had not started it)."""
    pieces = iter(stream)
    try:
        for piece in pieces:
            show(piece)
    except KeyboardInterrupt:
        pieces.close()  # stops the ranks (if the interrupt came while showing) and keeps the text so far
        return True
    return False


def context_notice(reply) -> str | None:
    """What a front end tells when a conversation's earliest messages were left out to fit."""
    n = reply.stats.dropped_messages if reply is not None else 0
    if not n:
        return None
    return f"(dropped {counted(n, 'earlier message')} to fit the {reply.stats.max_context}-token context)"
