"""The error every stage raises for something the user can fix.

The CLI prints it as ``error: <message>`` and exits with status 2, never with a traceback; the
message names the option, file or sample at fault and says how to fix it.
"""


class UsageError(Exception):
    """Something the user gave cannot be used; the message says what and how to fix it."""
