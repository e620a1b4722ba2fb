"""The one exception type for problems a user can cause or fix; front ends print it as one line."""


class LlaisysError(Exception):
    """A user-facing error: a missing or corrupt model file, a bad option, an over-long prompt."""
