"""One module per `fastsam3d-distill` subcommand, each with ``add_parser(subparsers)`` and
``run(args)``; :mod:`fastsam3d_distill.cli` builds the parser from them and is the one place
that maps errors to exit statuses. Shared argument groups live in ``_common``."""
