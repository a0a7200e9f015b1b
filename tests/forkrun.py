"""`python SCRIPT ARGS` as a real child process, without paying Python's and torch's start-up for
each one (about 3 of the 4 seconds a small train.py or infer.py run takes here).

A zygote process imports torch and esm2lite's command-line modules once, then forks one child per
command. The child is a separate process with its own pid, working directory, environment, file
descriptors, exit status and signals, and runs the script exactly as `python` would: as
`__main__`, with `sys.argv` and `sys.path[0]` set the same way; it exits as the interpreter would
(SystemExit's code, a traceback and 1 for an exception, atexit handlers, flushed streams) or is
killed by a signal (reported as -signal, as subprocess does). What it skips is what costs time and
does not change a result: importing modules (the zygote did; an environment variable read at
import time has the zygote's value) and tearing modules down at exit.

A zygote runs no torch computation before forking (torch's thread pools start in each child, as in
a fresh process), and one command at a time; the fixture keeps two, as this machine has two cores.

    zygote = Zygote(env)                                  # conftest's `forkrun` fixture
    r = zygote.run(["train.py", "--csv", ...], cwd=d)     # subprocess.CompletedProcess (text)
    r = zygote.run(["-m", "esm2lite.commands.convert", a, b], cwd=d, env=env, fsize=4096)
    r = zygote.run(["-c", CODE, "arg"], cwd=d)
"""

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading

# torch._dynamo: torch.optim.Optimizer's constructor imports it (seconds); matplotlib: train.py's plots
PRELOAD = ["torch", "torch._dynamo", "numpy", "safetensors.torch", "esm2lite.training.loop", "esm2lite.inference.embed",
           "esm2lite.inference.score_file", "esm2lite.commands.export", "esm2lite.commands.convert", "esm2lite.commands.plot", "esm2lite.commands.infer", "esm2lite.commands.train", "esm2lite.cli"]
OPTIONAL = ["matplotlib.figure", "matplotlib.backends.backend_agg", "transformers", "peft"]


class Zygote:
    """`n` zygote processes; run() takes a free one (so up to n commands run at once)."""

    def __init__(self, env: dict, n: int = 2):
        self.env, self.free = env, queue.Queue()
        procs = [subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env=env, text=True, bufsize=1) for _ in range(n)]
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
            self.free.put(proc)
        self.procs = procs

    def run(self, argv: list, cwd=None, env: dict | None = None, fsize: int | None = None, umask: int | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """argv without the interpreter: [script, ...], ["-m", module, ...] or ["-c", code, ...]; cwd
        (default: this process's), env (default: the zygote's), fsize (bytes a file may grow to:
        beyond, writes fail with EFBIG as on a full disk), umask (default: the zygote's)."""
        argv = [str(a) for a in argv]
        proc = self.free.get()
        try:
            with tempfile.TemporaryDirectory() as d:
                out, err = os.path.join(d, "out"), os.path.join(d, "err")
                request = {"argv": argv, "cwd": str(cwd or os.getcwd()), "env": env or self.env, "fsize": fsize,
                           "umask": umask, "out": out, "err": err}
                proc.stdin.write(json.dumps(request) + "\n")
                pid = int(proc.stdout.readline())
                timer = threading.Timer(timeout, os.kill, (pid, signal.SIGKILL))  # a timeout: exit -9
                timer.start()
                try:
                    code = int(proc.stdout.readline())
                finally:
                    timer.cancel()
                with open(out, errors="replace") as f, open(err, errors="replace") as g:
                    return subprocess.CompletedProcess([sys.executable, *argv], code, f.read(), g.read())
        finally:
            self.free.put(proc)

    def close(self):
        for proc in self.procs:
            proc.stdin.close()
            proc.wait(timeout=60)


# ---------------------------------------------------------------- the zygote process


def _child(request: dict):
    """In the forked child: become `python ARGV`, run it and exit (never returns)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["out"]), (2, request["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    sys.stdin = open(0, closefd=False)
    if request["umask"] is not None:
        os.umask(request["umask"])
    if request["fsize"] is not None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
    try:
        _run_as_main(request["argv"])
        code = 0
    except SystemExit as e:  # what the interpreter does with it: None is 0, a message is printed, 1
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    import atexit

    atexit._run_exitfuncs()  # what an exit runs, then the streams flushed; module teardown is skipped
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_as_main(argv: list):
    import runpy

    if argv[0] == "-m":
        sys.path.insert(0, os.getcwd())
        sys.argv = argv[1:]
        sys.modules.pop(argv[1], None)  # as in `python -m`: the module runs as __main__, not imported first
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.path.insert(0, "")
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


def _serve():
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    os.write(1, b"ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        os.write(1, f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        os.write(1, f"{os.waitstatus_to_exitcode(status)}\n".encode())


if __name__ == "__main__":
    sys.path.pop(0)  # the tests directory; each child puts first what a fresh `python` would
    _serve()
