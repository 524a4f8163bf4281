"""The one shape of every `hie` command group."""

from __future__ import annotations

import typer


def command_group(help_text: str) -> typer.Typer:
    """A typer group with plain click help (typer's rich panels print "--help <bool>"), no shell
    completion and no rich tracebacks (a command's failure is one line on stderr)."""
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
