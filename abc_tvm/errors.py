"""The one exception type the CLI turns into a single stderr line and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (model, flags, files): the message says what to change."""


class InternalError(RuntimeError):
    """An inconsistency inside abc-tvm, never the user's fault: the CLI asks for a bug report
    (exit 3), naming the block or pass where it was found."""
