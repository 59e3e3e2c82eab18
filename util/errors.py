"""User-facing errors: one line on stderr, a non-zero exit, no traceback."""
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (flags, files, data) whose message says how to fix it."""


EXIT_USER_ERROR = 2


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the original message
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main; a UserError ends it with 'error: ...' and exit status 2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def optional_import(module: str, pip_name: str, what: str):
    """Import an optional package, or stop with one line naming it and the command that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the {pip_name} package, which is not installed: "
                        f"pip install {pip_name}") from None
