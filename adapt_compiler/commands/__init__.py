"""Subcommands of the `adapt-compiler` CLI, one file each (see cli.py)."""
