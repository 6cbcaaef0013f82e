"""The one exception type for mistakes a user can fix: the CLI prints it as one line, no traceback."""


class ScrivenError(Exception):
    """Bad input, a bad parameter or a bad file. The message names what is wrong."""
