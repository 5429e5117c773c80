"""What the command-line tools share: their refusals printed as one line, not a traceback."""
import contextlib
from typing import Iterator, Tuple, Type


@contextlib.contextmanager
def cli_errors(prog: str, errors: Tuple[Type[BaseException], ...]) -> Iterator[None]:
    """Report an exception of the ``errors`` types raised inside the block as one line
    ``PROG: error: MESSAGE`` with exit status 1: for refusals whose message already says what is
    wrong and how to fix it, where a traceback would only bury it."""
    try:
        yield
    except errors as err:
        raise SystemExit(f'{prog}: error: {err}') from None
