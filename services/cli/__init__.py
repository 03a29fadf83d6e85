"""The glm command line: one entry point, subcommands imported lazily."""
