"""A request for one reply, as the client sends it to every rank at once."""
import uuid
from dataclasses import asdict, dataclass, field

from ..errors import LlaisysError
from .sampling import SamplingParams

MAX_NEW_TOKENS = 512  # a reply's length limit unless the caller sets one
# What a model's matrices are computed in (the load option `weights`): its own types, or one for all.
WEIGHT_TYPES = ("auto", "bf16", "f32", "q8_0", "q4_0")
# What happens when a conversation outgrows the context: its oldest messages go (never the system
# prompt; whole messages, so that the chat template stays whole), or the request fails.
CONTEXT_POLICIES = ("trim", "error")


def check_context_policy(policy) -> None:
    """Raise a one-line LlaisysError unless `policy` is one of CONTEXT_POLICIES."""
    if policy not in CONTEXT_POLICIES:
        raise LlaisysError(f"context must be {' or '.join(CONTEXT_POLICIES)}, not {policy!r}")


@dataclass(frozen=True)
class ReplyRequest:
    """What to answer and how; every rank receives the same request."""

    messages: list[dict]
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    session: str = "default"  # names the conversation's cache on the ranks
    context: str = "trim"     # one of CONTEXT_POLICIES
    stream_to: str = ""       # the client's link address, where rank 0 sends the pieces
    stream_token: str = ""    # what rank 0 presents there first (the link is private)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_dict(self) -> dict:
        """The request as JSON-ready fields (for the stream link)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReplyRequest":
        """Inverse of to_dict."""
        return cls(**{**d, "sampling": SamplingParams(**d["sampling"]), "stop": tuple(d["stop"])})
