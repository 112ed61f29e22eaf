"""Subcommands of ``deepatlas-fast``: one module each, with ``add_arguments(parser)`` and ``run(args) -> int``."""
