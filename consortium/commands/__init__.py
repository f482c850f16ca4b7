"""One module per `consortium` subcommand (see consortium.cli)."""
