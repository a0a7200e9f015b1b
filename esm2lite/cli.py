"""Shared command-line plumbing: one-line errors, non-zero exits, --debug for tracebacks."""

import argparse
import sys

from .errors import Esm2liteError, TrainingInterrupted

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, like every other esm2lite error."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def run_main(main, argv=None) -> int:
    """Run main(argv); expected failures print one line on stderr and exit 2.

    `--debug` anywhere in argv shows the full traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        main(argv)
        return 0
    except (Esm2liteError, OSError) as e:  # bad input, or a file that cannot be read / written
        if debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
