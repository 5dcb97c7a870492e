"""Subcommands of the crossinfer CLI whose logic is more than a few lines."""
