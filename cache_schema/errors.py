"""Errors that reach the user as one line (`error: ...`) and a non-zero exit, never as a traceback."""


class UsageError(Exception):
    """Something the user gave cannot be used; the message says what and how to fix it."""


class CacheError(UsageError):
    """A cache cannot be used as asked: missing, incompatible, corrupt or locked."""
