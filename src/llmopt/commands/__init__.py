"""Subcommands of ``llmopt``; each module is discovered by ``llmopt.cli``."""
