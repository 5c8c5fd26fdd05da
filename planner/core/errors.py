"""The one error type user-facing code raises.

House rule: validate where objects are built and raise `DistplanError` naming the bad value
and what would be valid. The CLI turns it into one line on stderr and exit code 2.
"""


class DistplanError(Exception):
    """A user-facing error: bad input, an impossible configuration, a missing framework."""


def require(condition: bool, message: str) -> None:
    """Raise DistplanError(message) unless condition holds (never `assert` on user input)."""
    if not condition:
        raise DistplanError(message)
