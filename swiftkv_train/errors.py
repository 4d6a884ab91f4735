"""One exception type for bad user input, raised before any heavy work starts."""


class SwiftKVInputError(ValueError):
    """Bad input (a spec, a field, a file): the message names what is wrong and how to fix it."""
