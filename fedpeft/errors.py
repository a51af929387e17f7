"""One error type for bad user input; the CLI prints it as one line and exits with code 2."""


class UsageError(ValueError):
    """Bad input (argument, config, device file, payload): the message names the field and what is allowed."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def choice(field: str, value, allowed) -> None:
    """Reject `value` unless it is one of `allowed`, naming the field and the allowed values."""
    allowed = list(allowed)
    if value not in allowed:
        raise UsageError(f"{field}: unknown value {value!r}; allowed: {', '.join(map(str, allowed))}")
