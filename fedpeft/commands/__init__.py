"""CLI subcommands: one module each, discovered by fedpeft.cli."""
