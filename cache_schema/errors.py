"""The one error type of the contract: a cache cannot be used as asked (missing, incompatible, corrupt
or locked). Its message names the cache, part or file and the fix; the CLI prints it as one line."""


class CacheError(Exception):
    """A cache cannot be used as asked; the message says what and how to fix it."""
