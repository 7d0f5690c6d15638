"""Shared behaviour of the package's management commands."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class OneLineErrorCommand(BaseCommand):
    """A bad flag prints one line (``<command>: error: …``) and exits 2, without the usage
    block argparse prints; under ``call_command()`` it raises ``CommandError`` as usual."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        error = parser.error

        def one_line_error(message: str) -> None:
            if not parser.called_from_command_line:
                error(message)  # raises CommandError for call_command()
            sys.stderr.write(f"{subcommand}: error: {message}\n")
            sys.exit(2)

        parser.error = one_line_error  # type: ignore[method-assign]
        return parser
