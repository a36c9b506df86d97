"""Judge overlap in the step loop: the next step's rollouts go to the judge as soon as they are sampled, so their
scoring also runs beside the current step's update (not after it), and every step's rollouts are scored once."""
import threading
import time

from conftest import smoke_config

from exprl_jax.experiment import Experiment
from exprl_jax.steps import StepRunner


def _traced_runner(monkeypatch, events):
    """StepRunner whose score (slowed to 0.3 s, so it cannot finish unseen) and update record their intervals."""
    lock = threading.Lock()
    score, update = StepRunner.score, StepRunner.update

    def traced(name, fn, delay=0.0):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            time.sleep(delay)
            out = fn(self, *args, **kwargs)
            with lock:
                events.append((name, id(args[0]) if name == "score" else None, start, time.perf_counter()))
            return out
        return wrapper

    monkeypatch.setattr(StepRunner, "score", traced("score", score, 0.3))
    monkeypatch.setattr(StepRunner, "update", traced("update", update))


def _run_traced(tmp_path, monkeypatch, steps: int, overlap: bool):
    """(score events, update events) of a smoke run, each sorted by start time."""
    events = []
    _traced_runner(monkeypatch, events)
    cfg = smoke_config(**{"train.steps": steps, "judge.overlap": overlap, "eval.at_start": False,
                          "eval.at_end": False, "judge.cache": False, "loss.ppo_mini_batch_size": 0})
    Experiment(cfg, str(tmp_path)).run()
    return tuple(sorted((e for e in events if e[0] == name), key=lambda e: e[2]) for name in ("score", "update"))


def test_next_steps_judging_runs_beside_this_steps_update(tmp_path, monkeypatch):
    scores, updates = _run_traced(tmp_path, monkeypatch, steps=3, overlap=True)
    assert len(scores) == 3  # each step's rollouts scored exactly once (a prefetched scoring is not redone)
    assert len(updates) == 3
    for step in range(2):  # the scoring of step s+1 started before the update of step s ended
        assert scores[step + 1][2] < updates[step][3]


def test_without_overlap_scoring_waits_for_its_own_step(tmp_path, monkeypatch):
    scores, updates = _run_traced(tmp_path, monkeypatch, steps=2, overlap=False)
    assert len(scores) == 2 and scores[1][2] > updates[0][3]  # on-policy: step 1 is sampled after update 0
