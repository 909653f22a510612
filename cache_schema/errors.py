"""Errors raised by cache readers and writers; each message is one line saying what and how to fix it."""


class CacheError(Exception):
    """A cache cannot be used as asked: missing, incompatible, corrupt or locked."""
