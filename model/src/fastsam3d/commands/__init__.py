"""One module per `fastsam3d` subcommand; each has ``add_parser(subparsers)`` and ``run(args)``."""

COMMANDS = ("info", "download", "segment", "convert", "bench", "serve", "export_onnx")
