"""One exception type for bad user input: its message is the one sentence the user sees."""


class DcustomError(Exception):
    """A user-facing error: which file or key, what is wrong, what would be accepted."""
