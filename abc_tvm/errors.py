"""The one exception type the CLI turns into a single stderr line and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (model, flags, files): the message says what to change."""
