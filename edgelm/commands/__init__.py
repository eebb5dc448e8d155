"""One module per `edgelm` subcommand: a pure function plus a thin main()."""
