"""Argument checks shared by every layer: a user's bad value is one ValueError that names it."""

from pathlib import Path


def is_whole(value) -> bool:
    """A Python int that is not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_whole(name: str, value, low=None, high=None, hint: str = "") -> None:
    """ValueError unless `value` is a whole number in [low, high] (either bound may be None).

    The message reads "NAME must be a whole number >= LOW[ HINT], got VALUE"; `hint` says what
    else is accepted (", or None for no limit;")."""
    if is_whole(value) and (low is None or value >= low) and (high is None or value <= high):
        return
    if low is not None and high is not None:
        bounds = f" from {low} to {high}"
    elif low is not None:
        bounds = f" >= {low}"
    elif high is not None:
        bounds = f" <= {high}"
    else:
        bounds = ""
    raise ValueError(f"{name} must be a whole number{bounds}{hint or ','} got {value!r}")


def read_text_file(path, name: str, content: str) -> str:
    """The UTF-8 text of the file at `path`, which argument `name` gave for `content` ("a JSON Schema");
    a folder, a missing, unreadable, non-UTF-8 or empty file is one error naming `name` and the fix."""
    where = f"{name} file {path}"
    if Path(path).is_dir():
        raise ValueError(f"{name} {path} is a folder; pass {content} file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} does not exist; pass {content} file") from None
    except PermissionError:
        raise ValueError(f"{where} cannot be read (permission denied); pass {content} file you can read") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{where} cannot be read ({e.strerror or e}); pass {content} file") from None
    if not text.strip():
        raise ValueError(f"{where} is empty; write {content} in it")
    return text
