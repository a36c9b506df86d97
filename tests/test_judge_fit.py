"""The judge must fit the data, checked at startup: a programmatic judge on records without checkpoints, or a
domain without a judge template for the run's mode, is an error naming the judge and the data."""
import dataclasses

import pytest

from conftest import smoke_config

from exprl_jax.data import QARecord
from exprl_jax.judge.fit import JudgeDataMismatch, check_judge_fits, programmatic_can_verify
from exprl_jax.rewards.factory import describe_data, domain_template_sets, make_reward_fn
from exprl_jax.tasks.toy import addition_records

GSM8K_LIKE = [QARecord(id=f"gsm8k/train/{i}", problem="Tom has 2 apples and buys 3. How many?",
                       reference="2 + 3 = <<2+3=5>>5\n#### 5", answer="5", domain="math") for i in range(4)]


def test_what_the_programmatic_judge_can_verify():
    assert all(programmatic_can_verify(r) for r in addition_records(8, seed=0))  # a+b=c, \boxed{c}
    assert not programmatic_can_verify(GSM8K_LIKE[0])  # no \boxed{} answer, no name=value checkpoint
    carried = QARecord(id="t", problem="p", reference="so \\boxed{7}", answer="7", checkpoints=("x=7",))
    assert programmatic_can_verify(carried)
    assert not programmatic_can_verify(dataclasses.replace(carried, reference="so 7"))


def test_programmatic_judge_on_gsm8k_is_refused_at_startup(tmp_path):
    cfg = smoke_config(**{"data.source": "gsm8k", "data.train_path": "/data/gsm8k/train.jsonl"})
    with pytest.raises(JudgeDataMismatch) as err:
        make_reward_fn(cfg, str(tmp_path), GSM8K_LIKE)
    message = str(err.value)
    assert message.startswith("judge.backend='programmatic' (outcome) cannot score data.source='gsm8k' "
                              "data.train_path='/data/gsm8k/train.jsonl': 4 of 4 records carry no checkpoints")
    assert "gsm8k/train/0, gsm8k/train/1, gsm8k/train/2)" in message and "python -m exprl_jax.serve" in message
    tfds_cfg = smoke_config(**{"data.source": "tfds", "data.tfds_name": "exprl_qa/gsm8k"})
    assert describe_data(tfds_cfg.data) == "data.tfds_name='exprl_qa/gsm8k'[train]"
    assert make_reward_fn(smoke_config(), str(tmp_path), addition_records(8, seed=0)) is not None


def test_a_domain_without_a_template_for_the_mode_is_refused(tmp_path):
    code = [QARecord(id="c/0", problem="Write f.", reference="def f(): return 1", answer="1", domain="code")]
    process = smoke_config(**{"method": "exprl_process", "judge.backend": "openai", "judge.base_url": "http://x/v1",
                              "judge.model": "m"})
    with pytest.raises(JudgeDataMismatch, match=r"judge.backend='openai' \(process\) cannot score .*: 1 records of "
                                                r"domain 'code': template set 'code' has no template for "
                                                r"'process-segment'"):
        make_reward_fn(process, str(tmp_path), code)
    outcome = dataclasses.replace(process, method="exprl_outcome")
    assert make_reward_fn(outcome, str(tmp_path), code).template_for("code").key == "code-review.v1"
    commonsense = [dataclasses.replace(code[0], domain="commonsense")]
    with pytest.raises(JudgeDataMismatch, match="domain 'commonsense': no judge template set .*judge.domain_templates"):
        make_reward_fn(outcome, str(tmp_path), commonsense)
    mapped = dataclasses.replace(outcome, judge=dataclasses.replace(outcome.judge,
                                                                    domain_templates=("commonsense=science",)))
    judge = make_reward_fn(mapped, str(tmp_path), commonsense)
    assert check_judge_fits(judge, "openai", commonsense, "x") == {"commonsense": 1}
    with pytest.raises(ValueError, match="domain_templates: bad entry 'commonsense=poetry'"):
        domain_template_sets(("commonsense=poetry",))
