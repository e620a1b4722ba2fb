"""What a finished reply carries: its text, token ids and timings. Shared by the engine and clients."""
from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    """Counts and timings of one reply."""

    prompt_tokens: int = 0
    cached_tokens: int = 0       # prompt tokens whose keys/values were already in the cache
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    first_token_seconds: float = 0.0  # from the request to the first token
    decode_seconds: float = 0.0
    finish_reason: str = ""      # stop | length | context | interrupted | error
    dropped_messages: int = 0    # earliest messages left out so that the conversation fits the context
    max_context: int = 0         # the context it had to fit

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens computed per second (cached ones excluded)."""
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one."""
        return (self.new_tokens - 1) / self.decode_seconds if self.new_tokens > 1 and self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """Fields and rates as a plain dict."""
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationStats":
        """Inverse of to_dict (rates are recomputed)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Reply:
    """A finished (or stopped) reply."""

    text: str
    prompt_ids: list[int] = field(default_factory=list)
    new_ids: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict:
        """JSON-ready fields, rates included."""
        return {"text": self.text, "prompt_ids": self.prompt_ids, "new_ids": self.new_ids, **self.stats.to_dict()}
