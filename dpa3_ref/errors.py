"""One exception type for every problem a user can cause (bad input, bad file, bad option)."""


class Dpa3Error(ValueError):
    """A user-facing error: the message names the file, atom, key or option at fault."""
