"""The one exception type for problems a user can cause or fix; front ends print it as one line."""


class LlaisysError(Exception):
    """A user-facing error: a missing or corrupt model file, a bad option, an over-long prompt."""


class EnginesDown(LlaisysError):
    """An engine died, stopped or left the cluster: the client restarts the engines before its next
    call (or on restart()), and conversations carry on from what they hold."""
