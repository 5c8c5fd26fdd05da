"""Usage errors (a bad option value, a missing or unknown option, an unknown command) as one line.

click raises them while it parses the command line; `usage_line` turns each into one line that names the
option, the value given and what is valid, e.g. "--gpus 'abc' is not an integer (Total number of GPUs.)",
in place of click's usage block and error panel. planner/cli.py prints it and exits with code 2.
"""

from __future__ import annotations

from planner.core.fields import short

try:  # typer >= 0.20 parses with its own copy of click
    from typer._click import exceptions
except ImportError:  # pragma: no cover
    from click import exceptions

UsageError = exceptions.UsageError
NoArgsIsHelpError = getattr(exceptions, "NoArgsIsHelpError", ())  # `distplan` alone: click prints the help

# an option's type in words, for error messages
KINDS = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _kind(param) -> str:
    """'int', 'float', 'str', 'bool', 'Path', ... of a typer (bare_type) or click (type.name) parameter."""
    bare = getattr(param, "bare_type", None)
    if callable(bare):
        return str(bare())
    return str(getattr(getattr(param, "type", None), "name", "")).replace("integer", "int")


def _given(param, argv: list[str]) -> str | None:
    """The last value given on the command line to option `param`, or None."""
    value = None
    opts = [o for o in [*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())] if o.startswith("-")]
    for i, tok in enumerate(argv):
        for opt in opts:
            if tok == opt and i + 1 < len(argv):
                value = argv[i + 1]
            elif opt.startswith("--") and tok.startswith(opt + "="):
                value = tok[len(opt) + 1:]
            elif not opt.startswith("--") and tok.startswith(opt) and len(tok) > len(opt):
                value = tok[len(opt):]
    return value


def _name(param) -> str:
    opts = [o for o in getattr(param, "opts", ()) if o.startswith("-")]
    return " / ".join(opts) if opts else str(getattr(param, "name", "argument")).upper()


def _help(param) -> str:
    text = " ".join(str(getattr(param, "help", None) or "").split())
    return f" ({text})" if text else ""


def _plain(message: str) -> str:
    message = " ".join(str(message).split()).rstrip(".")
    return message[:1].lower() + message[1:]


def usage_line(exc: UsageError, argv: list[str], prog: str = "distplan") -> str:
    """One line for a usage error raised while parsing `argv` (the arguments after `prog`, the program's name)."""
    ctx = getattr(exc, "ctx", None)
    command = next((a for a in argv if not a.startswith("-")), "")
    where = f"`{ctx.command_path if ctx is not None else f'{prog} {command}'.strip()} --help`"
    param = getattr(exc, "param", None)
    if isinstance(exc, exceptions.MissingParameter) and param is not None:
        what = "option" if _name(param).startswith("-") else "argument"
        return f"missing {what} {_name(param)}{_help(param)}"
    if isinstance(exc, exceptions.BadParameter) and param is not None:
        opt = _name(param).split(" / ")[0]
        value = _given(param, argv) if opt.startswith("-") else None
        kind = KINDS.get(_kind(param))
        if value is not None and kind:
            return f"{opt} {short(value)} is not {kind}{_help(param)}"
        return f"{opt}{f' {short(value)}' if value is not None else ''}: {_plain(exc.message)}{_help(param)}"
    if isinstance(exc, exceptions.NoSuchOption):
        maybe = sorted(getattr(exc, "possibilities", None) or ())
        hint = f"; did you mean {' or '.join(maybe)}?" if maybe else f"; see {where}"
        return f"no such option {exc.option_name}{hint}"
    message = _plain(exc.message)
    if message.startswith("no such command") and ctx is not None:
        return f"{message}; commands: {', '.join(ctx.command.list_commands(ctx))}"
    return f"{message}; see {where}"
