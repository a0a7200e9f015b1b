"""esm2lite-plot RUN: draw a finished run's plots (training/plot.py) again, as PNGs in RUN/plots/."""


from esm2lite.checkpoints.run_dir import Checkpointer
from esm2lite.cli import OneLineParser, exit_process, run_main
from esm2lite.errors import Esm2liteError
from esm2lite.runtime.distributed import Dist
from esm2lite.tasks import TASKS
from esm2lite.training import plot

PROG = "esm2lite-plot"


def main(argv, prog: str = PROG) -> None:
    p = OneLineParser(prog=prog, description="Draw the plots of a finished train.py run "
                      "(learning curves; predicted vs true or confusion matrix) as PNGs in RUN/plots/.")
    p.add_argument("run", help="a train.py output directory (--out) of a finished run")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    if not plot.available():
        raise Esm2liteError(f"plots need matplotlib, which is not installed: {plot.INSTALL}")
    run = Checkpointer(args.run, Dist())
    log, summary, predictions = run.read_finished()
    if summary.get("task") not in TASKS:
        raise Esm2liteError(f"{run.summary}: written by an esm2lite that did not record the task; cannot plot it")
    paths = plot.write_plots(run.plots, log, summary, predictions)
    print("wrote " + ", ".join(paths))


def console() -> None:
    """The esm2lite-plot command."""
    exit_process(run_main(main))


if __name__ == "__main__":
    exit_process(run_main(lambda argv: main(argv, "python -m esm2lite.commands.plot")))
