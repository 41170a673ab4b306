"""The error users see for bad input: a message that names the problem and what to do."""

import functools
import sys
from typing import Callable


class InputError(ValueError):
    """Bad input (config, data, weights, checkpoint): reported as one clear message, no traceback."""


class ModelLoadError(InputError):
    """A model name or pretrained path that cannot be used."""


def command(main: Callable[..., int]) -> Callable[..., int]:
    """A command's ``main``: an ``InputError`` becomes one ``error:`` line on stderr and exit status 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return run
