"""The error users see for bad input: a message that names the problem and what to do."""

import functools
import sys
from typing import Callable


class InputError(ValueError):
    """Bad input (config, data, weights, checkpoint): reported as one clear message, no traceback."""


class ModelLoadError(InputError):
    """A model name, pretrained path or tokenizer that cannot be used."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (a library's can run over many lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
