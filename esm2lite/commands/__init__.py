"""The command lines: shared plumbing (one-line errors, options from dataclasses) and each tool's main."""
