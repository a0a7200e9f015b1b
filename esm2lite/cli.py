"""Shared command-line plumbing: one-line errors, non-zero exits, --debug for tracebacks."""

import argparse
import dataclasses
import os
import re
import sys
import traceback
import typing

from esm2lite.errors import Esm2liteError, TrainingInterrupted

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
    except (MemoryError, RuntimeError) as e:  # out of memory (CPU or GPU): one line too; other errors are bugs
        if debug or not is_out_of_memory(e):
            raise
        say(out_of_memory_line(e))
        return EXIT_BAD_INPUT
    except TrainingInterrupted as e:
        say(str(e))
        return 128 + e.signum
    except KeyboardInterrupt:
        say("interrupted")
        return 130


def exit_process(code: int) -> None:
    """End the process with `code`. Under torchrun (WORLD_SIZE > 1) a rank ends with os._exit once
    its streams are flushed, skipping the interpreter's finalization: there, after every file is
    written and the process group destroyed, gloo's threads have at times aborted the process
    (SIGABRT, "terminate called without an active exception"), failing a run that had succeeded."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


OOM_TEXT = re.compile(r"out of memory|can't allocate memory|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)
PACKAGE = os.path.dirname(os.path.abspath(__file__))  # esm2lite/


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError (CUDA), or the RuntimeError torch's CPU allocator or cuBLAS raises."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and bool(OOM_TEXT.search(str(e)))))


def out_of_memory_line(e: BaseException) -> str:
    """"error: out of memory in esm2lite/model.py:88 (forward): CUDA out of memory. Tried to allocate
    2.00 GiB...": the innermost frame of esm2lite's own code (what was being done), and the first
    sentence or two of the message."""
    where = ""
    for frame, line in traceback.walk_tb(e.__traceback__):
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(PACKAGE + os.sep) and path != os.path.abspath(__file__):
            where = f" in esm2lite/{os.path.relpath(path, PACKAGE)}:{line} ({frame.f_code.co_name})"
    kind = "GPU memory" if type(e).__name__ == "OutOfMemoryError" or "cuda" in str(e).lower() else "memory"
    sentences = " ".join(str(e).split()).split(". ")
    first = next((i for i, s in enumerate(sentences) if OOM_TEXT.search(s)), 0)  # past "[enforce fail at ...]"
    detail = ". ".join(sentences[first:first + 2])[:200] or type(e).__name__
    return (f"error: out of {kind}{where}: {detail}; a smaller --batch-tokens (or a smaller model, or fewer "
            "processes on the device) needs less")


# ---------------------------------------------------------------- options from a config dataclass


def opt(default, help, group, **meta):
    """A config field that is also a command-line option (a dataclass default: built per instance).
    meta: flag (instead of --field-name), aliases (more flags), choices, metavar, item_type (tuples),
    prefix and fields (a nested config)."""
    if isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"help": help, "group": group, **meta})
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **meta})


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One option per field of the dataclass `cls` whose metadata names a group (see
    train_config.opt): --field-name (or metadata "flag"), help, choices and default from the field.
    A nested dataclass field lists the sub-fields it offers, as `prefix` + sub-field name."""
    groups, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "group" not in f.metadata:
            continue
        group = groups.get(f.metadata["group"]) or groups.setdefault(
            f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        if "fields" in f.metadata:  # a nested config: its own fields' defaults and help
            sub = {s.name: s for s in dataclasses.fields(hints[f.name])}
            sub_hints = typing.get_type_hints(hints[f.name])
            for name in f.metadata["fields"]:
                _add(group, f.metadata["prefix"] + name.replace("_", "-"), f"{f.name}.{name}", sub_hints[name],
                     sub[name].default, sub[name].metadata)
        else:
            _add(group, f.metadata.get("flag", "--" + f.name.replace("_", "-")), f.name, hints[f.name],
                 f.default, f.metadata)


def _add(group, flag: str, dest: str, hint, default, meta) -> None:
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)  # int | None -> int
    help_text = meta.get("help", "")
    if default is not None and default is not False and "default" not in help_text:  # None / off: nothing to say
        help_text += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
    kw = {"dest": dest, "help": help_text, "default": default}
    if kind is bool:
        kw["action"] = "store_true"
    elif kind is tuple:
        kw.update(nargs="+", default=None if default is None else list(default), type=meta.get("item_type", str))
    else:
        kw["type"] = kind
    if "choices" in meta:
        kw["choices"] = list(meta["choices"])
    elif kind is not bool:
        kw["metavar"] = meta.get("metavar", flag.lstrip("-").upper().replace("-", "_"))
    group.add_argument(flag, *meta.get("aliases", ()), **kw)


def options_to_config(cls, args: argparse.Namespace):
    """The dataclass `cls` from parsed options (nested configs built from their sub-options).
    A nested config's ValueError ("LoRAConfig.rank = 0: ...") names the option ("--lora-rank = 0")."""
    hints, kwargs = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if "fields" in f.metadata:
            sub = {name: getattr(args, f"{f.name}.{name}") for name in f.metadata["fields"]}
            sub = {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
            try:
                kwargs[f.name] = hints[f.name](**sub)
            except ValueError as e:
                raise UsageError(str(e).replace(f"{hints[f.name].__name__}.", f.metadata["prefix"])) from None
        elif "group" in f.metadata:
            value = getattr(args, f.name)
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def saved_options(cls, saved: dict) -> argparse.Namespace:
    """The options a saved config (cls(...).to_dict(), e.g. a run's config.json) was made from, as
    parse_args' namespace: parse_args(argv, namespace=saved_options(...)) keeps every saved value but
    those of the options argv gives (argparse fills in a default only where the namespace has none)."""
    ns = argparse.Namespace()
    for f in dataclasses.fields(cls):
        if f.name not in saved:
            continue
        if "fields" in f.metadata:
            for name in f.metadata["fields"]:
                if isinstance(saved[f.name], dict) and name in saved[f.name]:
                    setattr(ns, f"{f.name}.{name}", saved[f.name][name])
        elif "group" in f.metadata:
            setattr(ns, f.name, saved[f.name])
    return ns


class UsageError(ValueError):
    """A bad option value found while building a config: the parser reports it (exit 2)."""
