"""The subcommands of ``python -m fused_accum``: each module adds its options and runs."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, unless the help already states it (as
    ``bench`` does its own)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)
