"""The error users see for bad input: a message that names the problem and what to do."""


class InputError(ValueError):
    """Bad input (config, data, weights, checkpoint): reported as one clear message, no traceback."""
