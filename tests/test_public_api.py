"""The stable names other code and outside checks import (`import exprl_jax as ex`)."""
import inspect

import exprl_jax as ex


def test_top_level_names_and_signatures():
    for name in ("ModelConfig", "init_params", "forward", "load_hf", "save_hf", "generate", "token_logprobs",
                 "SampleOutput"):
        assert hasattr(ex, name), name
    assert list(inspect.signature(ex.forward).parameters) == ["config", "params", "tokens", "attention_mask",
                                                              "positions"]
    gen = inspect.signature(ex.generate).parameters
    for kw, default in (("max_new_tokens", inspect.Parameter.empty), ("num_samples", 1), ("temperature", 1.0),
                        ("top_p", 1.0), ("top_k", 0), ("eos_ids", ()), ("pad_id", 0)):
        assert gen[kw].default == default, kw
    assert list(inspect.signature(ex.token_logprobs).parameters)[:3] == ["config", "params", "tokens"]
    for preset in ("tiny", "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "from_hf_config"):
        assert callable(getattr(ex.ModelConfig, preset))


def test_issue_level_module_apis():
    from exprl_jax import advantages, evaluate, losses
    from exprl_jax.judge import parse_score
    from exprl_jax.rewards.answers import extract_answer, is_equivalent

    assert callable(losses.policy_loss) and callable(losses.kl_penalty) and callable(losses.sft_loss)
    assert callable(advantages.grpo) and callable(advantages.process) and callable(evaluate.pass_at_k)
    assert parse_score("Reasoning: fine\nScore: 4") == 4
    assert extract_answer(r"so \boxed{\frac{1}{2}}") == r"\frac{1}{2}" and is_equivalent("0.5", r"\frac{1}{2}")
