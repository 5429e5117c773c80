"""What the command-line tools share: their refusals printed as one line, not a traceback, and
argument types that say what is wrong with a value."""
import argparse
import contextlib
from typing import Callable, Iterator, Tuple, Type


@contextlib.contextmanager
def cli_errors(prog: str, errors: Tuple[Type[BaseException], ...]) -> Iterator[None]:
    """Report an exception of the ``errors`` types raised inside the block as one line
    ``PROG: error: MESSAGE`` with exit status 1: for refusals whose message already says what is
    wrong and how to fix it, where a traceback would only bury it."""
    try:
        yield
    except errors as err:
        raise SystemExit(f'{prog}: error: {err}') from None


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``, so that the command line says
    what is wrong with a count (``argument --num-train: ...``) rather than the code that gets it.

    Returns:
        callable: ``str -> int``, raising ``argparse.ArgumentTypeError`` for anything else.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f'must be an integer >= {minimum}, got {text!r}')
        return value

    return parse
