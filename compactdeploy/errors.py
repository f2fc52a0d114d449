"""The one exception type a user is meant to see."""


class CompactDeployError(Exception):
    """Bad input or an unmet requirement, explained in one line that says what to do.

    The CLI prints it without a traceback and exits non-zero; anything else that escapes is a bug.
    """


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, for one-line errors about third-party failures."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
