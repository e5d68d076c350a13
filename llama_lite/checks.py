"""Argument checks shared by every layer: a user's bad value is one ValueError that names it."""


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
