"""The one exception type that reaches users.

Library code raises :class:`LmscopeError` with a single sentence that names the
offending input and what would fix it; the CLI prints that sentence and exits
non-zero, never a traceback.
"""


class LmscopeError(Exception):
    """A user-facing error: ``str(err)`` is one sentence naming the input and the fix."""
