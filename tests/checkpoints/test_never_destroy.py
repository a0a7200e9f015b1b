"""Never destroy what is not ours (issue 25 A), below the command lines (test_bad_input.py runs the
cases through them): which paths name an input whatever the spelling (paths.py), which directories
are a run's (checkpointer.is_run_config), and predictions + metrics replaced as one set, so that no
kill leaves new predictions beside old metrics or the reverse (atomic.write_together)."""

import json
import os
import stat

import pytest

from esm2lite.files import atomic
from esm2lite.files.atomic import umask, write_together
from esm2lite.checkpoints.run_dir import RUN_FORMAT, is_run_config
from esm2lite.errors import Esm2liteError
from esm2lite.files.paths import Input, check_output, dangling, within
from test_infer import infer_in_process, load_cli, trained_run


# ---------------------------------------------------------------- paths: one input, many spellings


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """base/ (a directory holding config.json), in.csv, and links to them; cwd = tmp_path/work."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "in.csv").write_text("sequence\nMKV\n")
    (tmp_path / "base_link").symlink_to(tmp_path / "base")
    (tmp_path / "in_link.csv").symlink_to("in.csv")
    os.link(tmp_path / "in.csv", tmp_path / "in_hard.csv")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


@pytest.mark.parametrize("spelling", ["../in.csv", "./../work/../in.csv", "{t}/in.csv", "{t}/in_link.csv",
                                      "{t}/in_hard.csv", "../base/config.json", "../base_link/config.json",
                                      "../base", "../base_link/", "../base/../base/new/file.csv"])
def test_every_spelling_of_an_input_is_found(tree, spelling):
    path = spelling.format(t=tree)
    assert within(path, "../in.csv") or within(path, str(tree / "base"))


@pytest.mark.parametrize("spelling", ["../in2.csv", "../work/in.csv", "../basement", "../base.csv", "."])
def test_other_paths_are_not_inputs(tree, spelling):
    assert not within(spelling, "../in.csv") and not within(spelling, str(tree / "base"))


def test_check_output_names_the_output_and_the_input(tree):
    base = Input(str(tree / "base"), "the base model (--checkpoint B)")
    data = Input("../in.csv", "the input (--input ../in.csv)")
    missing = Input("../nope.csv", "an input that is not there")
    with pytest.raises(Esm2liteError, match=r"^\.\./in_hard\.csv: is also the input \(--input \.\./in\.csv\); "
                                            r"choose another --output$"):
        check_output("../in_hard.csv", "--output", [missing, base, data])
    with pytest.raises(Esm2liteError, match=r"^\.\./base_link/x: is inside the base model \(--checkpoint B\); "):
        check_output("../base_link/x", "--out", [base])
    with pytest.raises(Esm2liteError, match=r"^\.\.: holds the input \(--input \.\./in\.csv\); choose another --merged$"):
        check_output("..", "--merged", [data], replaces=True)
    check_output("..", "--out", [data])  # a directory that is only written into, not replaced
    check_output("../nope.csv", "--output", [missing, base, data])  # an absent input cannot be destroyed
    check_output("pred.csv", "--output", [Input(None, "unset"), base, data])


def test_a_dangling_link_is_refused_in_one_line(tree):
    (tree / "work" / "gone").symlink_to("nowhere")
    assert dangling("gone") == str(tree / "work" / "gone") and dangling("gone/a/b") == str(tree / "work" / "gone")
    assert dangling("new/a/b") is None and dangling("../in_link.csv") is None
    with pytest.raises(Esm2liteError, match=r"^gone: is a symbolic link to nowhere, which does not exist; "
                                            r"remove the link or choose another --out$"):
        check_output("gone", "--out")
    with pytest.raises(Esm2liteError, match=r"^gone/x\.csv: passes through .*/work/gone, a symbolic link to nowhere"):
        check_output("gone/x.csv", "--output")


# ---------------------------------------------------------------- which directories are a run's


def test_a_run_config_is_known_by_its_format_or_as_the_previous_versions_settings():
    previous = {"out": "runs/x", "task": "regression", "mode": "lora", "grad_accum": 1, "world_size": 1, "lr": 1e-3}
    assert is_run_config({"format": RUN_FORMAT}, has_log=False)
    assert is_run_config(previous, has_log=True)
    assert not is_run_config(previous, has_log=False)  # settings-like, but no log beside them: not proof enough
    assert not is_run_config({**previous, "format": "esm2lite-finetuned"}, has_log=True)  # a checkpoint's
    assert not is_run_config({**previous, "grad_accum": "1"}, has_log=True)
    assert not is_run_config({"model_type": "esm", "hidden_size": 64}, has_log=True)  # an HF model's
    assert not is_run_config({}, has_log=True) and not is_run_config([1], has_log=True)


# ---------------------------------------------------------------- predictions and metrics as one set


class Killed(BaseException):
    """What the process sees of a SIGKILL: nothing more runs (not even an except Exception)."""


def _kill_after(monkeypatch, n: int) -> None:
    """Kill the writer after n removals or renames of visible files (the steps a kill may fall
    between); removing a hidden temporary is the cleanup after it, which a real kill skips."""
    done = [0]

    def killable(real, cleanup_too: bool):
        def step(path, *rest):
            if cleanup_too or not os.path.basename(path).startswith("."):
                if done[0] == n:
                    raise Killed
                done[0] += 1
            real(path, *rest)
        return step
    monkeypatch.setattr(atomic.os, "remove", killable(os.remove, cleanup_too=False))
    monkeypatch.setattr(atomic.os, "replace", killable(os.replace, cleanup_too=True))


def _visible(d) -> dict:
    return {p.name: p.read_text() for p in d.iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("with_residues", [False, True])
@pytest.mark.parametrize("new_metrics", [True, False], ids=["labelled", "unlabelled"])
def test_a_kill_at_any_instant_never_leaves_new_predictions_beside_old_metrics(tmp_path, monkeypatch, new_metrics,
                                                                               with_residues):
    names = ["p.csv"] + (["r.csv"] if with_residues else []) + ["p.metrics.json"]
    new = {n: f"new {n}" for n in names}
    if not new_metrics:
        del new["p.metrics.json"]
    states = []
    for n in range(len(names) * 2 + 1):  # at most one removal and one rename per file
        d = tmp_path / str(n)
        d.mkdir()
        for name in names:
            (d / name).write_text(f"old {name}")
        with monkeypatch.context() as m:
            _kill_after(m, n)
            try:
                write_together([(str(d / name), new.get(name)) for name in names])
            except Killed:
                pass
        state = _visible(d)
        states.append(state)
        old = {k: v for k, v in state.items() if v.startswith("old ")}
        assert not old or len(old) == len(state), f"old and new files side by side after step {n}: {state}"
        assert "p.metrics.json" not in state or state["p.metrics.json"].split()[0] == state["p.csv"].split()[0], state
    assert states[-1] == new  # the last try ran to the end


def test_write_together_follows_the_umask_and_a_failed_write_leaves_the_old_set(tmp_path, monkeypatch):
    (tmp_path / "p.csv").write_text("old")
    (tmp_path / "p.metrics.json").write_text("old")
    write_together([(str(tmp_path / "p.csv"), "new"), (str(tmp_path / "p.metrics.json"), "{}")])
    for name in ("p.csv", "p.metrics.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask()
    real_seal = atomic._seal

    def full_disk(tmp):
        if "metrics" in tmp:
            raise OSError(28, "No space left on device")
        real_seal(tmp)
    monkeypatch.setattr(atomic, "_seal", full_disk)
    with pytest.raises(Esm2liteError, match=r"p\.metrics\.json: cannot write \(No space left on device\)"):
        write_together([(str(tmp_path / "p.csv"), "newer"), (str(tmp_path / "p.metrics.json"), "{1}")])
    assert sorted(os.listdir(tmp_path)) == ["p.csv", "p.metrics.json"]  # no temporaries left
    assert (tmp_path / "p.csv").read_text() == "new" and (tmp_path / "p.metrics.json").read_text() == "{}"


@pytest.fixture(scope="module")
def cli():
    return load_cli()


def test_infer_renames_the_metrics_last(tmp_path_factory, hf_tiny, tmp_path, monkeypatch, cli, capsys):
    """infer.py with labels: a failure after the predictions' rename leaves the new predictions and no
    metrics (the earlier metrics were removed first), and says so in one line."""
    run = trained_run(tmp_path_factory, hf_tiny)
    out, metrics = tmp_path / "pred.csv", tmp_path / "pred.metrics.json"
    out.write_text("old predictions\n")
    metrics.write_text('{"old": 1}\n')
    real = os.replace

    def fail_after_the_csv(src, dst):
        if str(dst).endswith(".metrics.json"):
            raise OSError(5, "Input/output error")
        real(src, dst)
    monkeypatch.setattr(atomic.os, "replace", fail_after_the_csv)
    code, _, err = infer_in_process(cli, capsys, "--run", run["run"], "--input", run["test"], "--output", out)
    assert code == 2 and err.strip() == f"error: {metrics}: cannot write (Input/output error)", err
    assert "prediction" in out.read_text().splitlines()[0]  # the new predictions, beside no metrics
    assert not metrics.exists()
    monkeypatch.undo()
    code, _, err = infer_in_process(cli, capsys, "--run", run["run"], "--input", run["test"], "--output", out)
    assert code == 0, err
    assert json.loads(metrics.read_text())["rows"] == len(out.read_text().splitlines()) - 1
