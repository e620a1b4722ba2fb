"""Sampling settings: checked where the user gives them, carried to the ranks unchanged."""
from dataclasses import asdict, dataclass

from ..errors import LlaisysError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise LlaisysError(f"temperature must be between 0 and 100, not {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise LlaisysError(f"top_k must be a whole number >= 0, not {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise LlaisysError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise LlaisysError(f"seed must be a whole number in [0, 2^64), not {self.seed!r}")

    def to_dict(self) -> dict:
        """The fields as a plain dict."""
        return asdict(self)
