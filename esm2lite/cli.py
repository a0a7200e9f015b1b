"""Shared command-line plumbing: one-line errors, non-zero exits, --debug for tracebacks."""

import argparse
import sys

from .errors import Esm2liteError, TrainingInterrupted

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, like every other esm2lite error."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def say(line: str) -> None:
    """One line on stderr in a single write: under torchrun every rank shares the stream, and
    print()'s separate newline write would interleave ranks' lines when stderr is unbuffered."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


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
        say(f"error: {' '.join(str(e).split())}")
        return EXIT_BAD_INPUT
    except TrainingInterrupted as e:
        say(str(e))
        return 128 + e.signum
    except KeyboardInterrupt:
        say("interrupted")
        return 130
