"""The one exception type for user mistakes: the CLI prints its message as one line, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, file, record) that they can fix.

    The message must name the file, record or config field and say what is wrong.
    """
