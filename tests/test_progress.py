"""Console progress that shows in any log: a line every train.log_every steps when the output is not a terminal,
a tqdm bar (and no lines) on a terminal, and lines from long evaluations and the testbed's base-model filter."""
import io
import re
import sys

from conftest import smoke_config

from exprl_jax.metrics import StepProgress, progress_line, report_progress

LINE = re.compile(r"^step (\d+)/(\d+) \| ([0-9.e+-]+) s/step \| loss (\S+) \| reward (\S+) \| sparse_acc (\S+) \| "
                  r"kl (\S+) \| unscored (\S+) \| judge_p50_s (\S+)$")


def test_progress_line_by_hand():
    row = {"loss/total": 0.5, "reward/mean": 0.25, "reward/sparse_acc": 0.125, "kl/ref": 0.001,
           "reward/unscored_frac": 0.0, "judge/latency_p50_s": 1.5, "other": 3.0}
    assert progress_line(4, 10, 1.25, row) == ("step 4/10 | 1.25 s/step | loss 0.5 | reward 0.25 | sparse_acc 0.125 "
                                              "| kl 0.001 | unscored 0 | judge_p50_s 1.5")
    # a metric the step did not log (SFT has no reward, a sparse run no judge) shows as "-", never as 0
    assert progress_line(1, 2, 0.5, {"loss/total": 2.0}).endswith(
        "loss 2 | reward - | sparse_acc - | kl - | unscored - | judge_p50_s -")


def test_lines_every_n_steps_and_at_the_end_when_not_a_terminal(capsys):
    progress = StepProgress(0, 5, 2, "grpo")
    for step in progress:
        progress.update(step + 1, {"loss/total": float(step)})
    lines = capsys.readouterr().out.splitlines()
    assert [LINE.match(x).group(1) for x in lines] == ["2", "4", "5"]  # every 2 steps, and the last one
    assert all(LINE.match(x).group(2) == "5" for x in lines)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_the_bar_only(monkeypatch):
    stdout, stderr = _Terminal(), _Terminal()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    progress = StepProgress(0, 3, 1, "grpo")
    for step in progress:
        progress.update(step + 1, {"loss/total": 1.0, "reward/mean": 0.5})
    assert stdout.getvalue() == ""
    assert "3/3" in stderr.getvalue() and "reward=0.5" in stderr.getvalue()


def test_a_file_gets_lines_while_the_terminal_gets_the_bar(monkeypatch):
    stdout, stderr = io.StringIO(), _Terminal()  # `run.py > log` from a terminal
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    progress = StepProgress(0, 2, 1, "grpo")
    for step in progress:
        progress.update(step + 1, {"loss/total": 1.0})
    assert [LINE.match(x).group(1) for x in stdout.getvalue().splitlines()] == ["1", "2"]
    assert "2/2" in stderr.getvalue()


def test_report_progress_format(capsys):
    import time

    report_progress("testbed filter", 64, 2048, "problems sampled", time.time() - 2.0)
    assert re.fullmatch(r"testbed filter: 64/2048 problems sampled \(2\.\d s\)\n", capsys.readouterr().out)


def test_a_redirected_run_shows_its_progress(tmp_path, capsys):
    """The smoke run with stdout not a terminal: one line per log_every steps with the run's own metrics, and the
    evaluations say what they sample and when they are done."""
    from exprl_jax.experiment import Experiment
    from exprl_jax.metrics import read_metrics

    cfg = smoke_config(**{"train.steps": 3, "train.log_every": 2, "train.save_every": 100})
    Experiment(cfg, str(tmp_path)).run()
    out = capsys.readouterr().out.splitlines()
    steps = [LINE.match(x) for x in out if x.startswith("step ")]
    assert [m.group(1) for m in steps] == ["2", "3"] and all(m.group(2) == "3" for m in steps)
    rows = {r["step"]: r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "loss/total" in r}
    for m in steps:  # the line shows the logged metrics of its step (judge latency: the programmatic judge's)
        row = rows[int(m.group(1))]
        assert float(m.group(4)) == float(f"{row['loss/total']:.4g}")
        assert float(m.group(6)) == float(f"{row['reward/sparse_acc']:.4g}")
        assert float(m.group(8)) == float(f"{row['reward/unscored_frac']:.4g}")
        assert m.group(9) == ("-" if "judge/latency_p50_s" not in row else f"{row['judge/latency_p50_s']:.4g}")
    for prefix in ("eval_start", "eval_end"):
        assert f"{prefix}: sampling 8 problems x 4 (up to 24 new tokens)" in out
        assert any(re.fullmatch(rf"{prefix}: 8/8 problems \([0-9.]+ s\)", x) for x in out)
