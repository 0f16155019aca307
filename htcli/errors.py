"""The one project exception: a mistake the user can fix, reported as one line without a traceback."""


class HtcliError(Exception):
    """A bad input or an impossible request; the message says what to do."""
