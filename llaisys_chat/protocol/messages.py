"""Chat messages: the list of {"role", "content"} dicts that a chat template renders."""
import re

from ..errors import LlaisysError

ROLES = ("system", "user", "assistant")


def build_messages(prompt: str | None = None, system: str | None = None, messages: list | None = None) -> list[dict]:
    """A chat message list from a prompt, an optional system line and/or earlier messages."""
    result = [] if messages is None else validate_messages(messages)
    if system is not None:
        result = [{"role": "system", "content": system}] + [m for m in result if m["role"] != "system"]
    if prompt is not None:
        result.append({"role": "user", "content": prompt})
    if not result:
        raise LlaisysError("nothing to answer: give a prompt or messages")
    return result


def validate_messages(messages) -> list[dict]:
    """Check a list of {"role", "content"} dicts; returns plain copies."""
    if not isinstance(messages, list):
        raise LlaisysError("messages must be a JSON list of {\"role\", \"content\"} objects")
    result = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LlaisysError(f"message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise LlaisysError(f"message {i} has role {m['role']!r}; use system, user or assistant")
        result.append({"role": m["role"], "content": m["content"]})
    return result


def opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt leaves a <think> block open (some reasoning templates end with
    "<think>\n"), so that the reply starts inside it and holds only the closing tag."""
    return prompt.rfind("<think>") > prompt.rfind("</think>")


def visible_reply(text: str) -> str:
    """A reply without its reasoning (<think>...</think>), as it should be fed back to the model.

    Handles templates that open <think> in the prompt, so that the reply holds only the closing
    tag, and replies stopped while still thinking.
    """
    close, opening = text.find("</think>"), text.find("<think>")
    if close >= 0 and (opening < 0 or close < opening):  # the prompt opened the reasoning
        text = text[close + len("</think>"):]
    text = _THINK_BLOCK.sub("", text)
    if "<think>" in text:
        text = text[: text.index("<think>")]
    return text.strip()


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that could be the start of tag (a tag cut between pieces)."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-n:])), 0)


def reply_markdown(text: str) -> str:
    """A reply as Markdown, its reasoning (<think>...</think>) folded away in a <details> block."""
    opening, closing = text.find("<think>"), text.find("</think>")
    if closing < 0:
        if opening < 0:
            return text
        thinking, answer = text[opening + len("<think>"):], ""  # stopped while still thinking
    else:
        start = opening + len("<think>") if 0 <= opening < closing else 0
        thinking, answer = text[start:closing], text[closing + len("</think>"):]
    folded = f"<details><summary>Reasoning</summary>\n\n{thinking.strip()}\n\n</details>\n\n"
    return folded + answer.lstrip()
