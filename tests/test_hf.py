"""HF checkpoint I/O: logits parity with transformers' PyTorch models, round trips, sharding, bf16, errors."""
import functools
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from exprl_jax.models import attention
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.hf import INDEX_FILE, SINGLE_FILE, load_hf, load_tokenizer, save_hf
from exprl_jax.models.transformer import forward, forward_with_cache, init_cache, init_params, positions_from_mask
from exprl_jax.sharding import make_mesh

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

DIMS = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
            head_dim=16, intermediate_size=128, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 50_000.0})
VARIANTS = {  # name -> (config class, extra fields, what our config must read from it)
    "qwen3": (transformers.Qwen3Config, {}, dict(family="qwen3", qk_norm=True, qkv_bias=False)),
    "qwen2": (transformers.Qwen2Config, {}, dict(family="qwen2", qkv_bias=True, o_bias=False)),
    "llama": (transformers.LlamaConfig, {}, dict(family="llama", tie_embeddings=False, qkv_bias=False)),
    "llama_tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}, dict(tie_embeddings=True)),
    "llama_bias": (transformers.LlamaConfig, {"attention_bias": True}, dict(qkv_bias=True, o_bias=True)),
}
PAD_LENGTHS = (0, 3, 7)  # left padding per row; row 0 has none
SEQ_LEN = 12


def _random_hf_model(variant: str, seed: int = 0):
    config_cls, extra, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**DIMS, **extra), attn_implementation="eager")
    with torch.no_grad():  # far from init values (ones, zeros), so a dropped norm or bias changes the logits
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.copy_(1.0 + 0.3 * torch.randn_like(weight))
            else:
                weight.normal_(0.0, 0.3 if name.endswith("bias") else 0.15)
    return model.eval()


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, DIMS["vocab_size"], (len(PAD_LENGTHS), SEQ_LEN)).astype(np.int32)
    mask = np.ones_like(tokens)
    for row, pad in enumerate(PAD_LENGTHS):
        mask[row, :pad] = 0
        tokens[row, :pad] = 0
    return tokens, mask


def _hf_logits(model, tokens, mask) -> np.ndarray:
    # Without position_ids transformers numbers slots 0..T-1, so a left-padded row's real tokens sit `pad` places
    # later than ours (cumsum(mask) - 1). RoPE scores depend only on position differences, so logits would agree
    # anyway up to rounding; passing our positions makes both models see identical inputs.
    positions = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def _random_params(config: ModelConfig, seed: int = 0):
    """Random params of the model's declared shapes, drawn with numpy: compiling `init_params` takes seconds."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def _jitted_forward(config: ModelConfig):
    return jax.jit(functools.partial(forward, config))


def _our_logits(config, params, tokens, mask) -> np.ndarray:
    return np.asarray(_jitted_forward(config)(params, tokens, attention_mask=mask))


def _max_error_at_real_tokens(ours, theirs, mask) -> float:
    real = mask.astype(bool)
    assert not real.all(), "the batch must contain left padding"
    return float(np.max(np.abs(ours[real] - theirs[real])))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_checkpoint(request, tmp_path_factory):
    """A random HF model saved as one safetensors file, with its reference logits on a left-padded batch."""
    variant = request.param
    model = _random_hf_model(variant)
    path = str(tmp_path_factory.mktemp(variant))
    model.save_pretrained(path)
    tokens, mask = _batch()
    return dict(variant=variant, model=model, path=path, tokens=tokens, mask=mask,
                logits=_hf_logits(model, tokens, mask))


# Every attention implementation that runs on CPU: splash in Pallas interpret mode, and the cudnn wrapper with
# XLA doing the work (`cudnn_xla`: the same jax.nn.dot_product_attention call, mask and GQA layout included).
ATTENTION_IMPLS = ("xla", "chunked", "splash", "cudnn_xla")


@pytest.fixture
def attention_impl(request, monkeypatch):
    if request.param != "cudnn_xla":
        yield request.param
        return
    monkeypatch.setattr(attention, "cudnn_attention",
                        functools.partial(attention.cudnn_attention, implementation="xla"))
    _jitted_forward.cache_clear()  # traces are cached per config: none may cross the patch
    yield "cudnn"
    _jitted_forward.cache_clear()


@pytest.mark.parametrize("attention_impl", ATTENTION_IMPLS, indirect=True)
def test_logits_match_transformers(hf_checkpoint, attention_impl):
    config, params = load_hf(hf_checkpoint["path"])
    for field, value in {**VARIANTS[hf_checkpoint["variant"]][2], "rope_theta": 50_000.0,
                         "rms_norm_eps": 1e-5, "param_dtype": "float32"}.items():
        assert getattr(config, field) == value, field
    assert ("lm_head" in params) != config.tie_embeddings
    config = config.replace(attention_impl=attention_impl, attention_block_q=8, attention_block_kv=8)
    ours = _our_logits(config, params, hf_checkpoint["tokens"], hf_checkpoint["mask"])
    assert _max_error_at_real_tokens(ours, hf_checkpoint["logits"], hf_checkpoint["mask"]) <= 1e-4


@pytest.mark.parametrize("attention_impl", ATTENTION_IMPLS, indirect=True)
@pytest.mark.parametrize("hf_checkpoint", ["qwen3"], indirect=True)
def test_cache_logits_match_transformers(hf_checkpoint, attention_impl):
    """Prefill from slot 0 (a static cache index: splash / cudnn run their kernel), then decode one token at a
    time (a traced index: they fall back to chunked); every step's logits equal HF's full forward."""
    config, params = load_hf(hf_checkpoint["path"])
    config = config.replace(attention_impl=attention_impl, attention_block_q=4, attention_block_kv=4)
    tokens, mask, expected = hf_checkpoint["tokens"], hf_checkpoint["mask"], hf_checkpoint["logits"]
    prefill, steps = SEQ_LEN - 3, 3
    positions = np.asarray(positions_from_mask(mask))
    kv_valid = np.concatenate([mask[:, :prefill], np.zeros((len(mask), steps), np.int32)], axis=1)
    caches = init_cache(config, len(mask), SEQ_LEN)
    run = jax.jit(functools.partial(forward_with_cache, config), static_argnums=4)  # the cache index
    logits, caches = run(params, tokens[:, :prefill], positions[:, :prefill], caches, 0, kv_valid)
    real = mask[:, :prefill].astype(bool)
    assert np.max(np.abs(np.asarray(logits)[real] - expected[:, :prefill][real])) <= 1e-4
    decode = jax.jit(functools.partial(forward_with_cache, config))
    for slot in range(prefill, SEQ_LEN):
        kv_valid[:, slot] = 1
        logits, caches = decode(params, tokens[:, slot:slot + 1], positions[:, slot:slot + 1], caches, slot,
                                kv_valid)
        assert np.max(np.abs(np.asarray(logits)[:, 0] - expected[:, slot])) <= 1e-4, slot


def test_save_hf_round_trips_through_transformers(hf_checkpoint, tmp_path):
    config, params = load_hf(hf_checkpoint["path"])
    save_hf(str(tmp_path), config, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    assert type(reloaded) is type(hf_checkpoint["model"])
    original = hf_checkpoint["model"].state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    logits = _hf_logits(reloaded.eval(), hf_checkpoint["tokens"], hf_checkpoint["mask"])
    assert _max_error_at_real_tokens(logits, hf_checkpoint["logits"], hf_checkpoint["mask"]) <= 1e-5
    transformers.GenerationConfig.from_pretrained(str(tmp_path))  # vLLM reads it too; must parse


def test_sharded_checkpoints_load_and_save(tmp_path):
    model = _random_hf_model("qwen2", seed=1)
    hf_dir, ours_dir = str(tmp_path / "hf"), str(tmp_path / "ours")
    model.save_pretrained(hf_dir, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(hf_dir, INDEX_FILE)) and not os.path.exists(os.path.join(hf_dir, SINGLE_FILE))
    config, params = load_hf(hf_dir)
    tokens, mask = _batch(seed=1)
    expected = _hf_logits(model, tokens, mask)
    assert _max_error_at_real_tokens(_our_logits(config, params, tokens, mask), expected, mask) <= 1e-4

    save_hf(ours_dir, config, params, max_shard_bytes=40_000)
    shards = sorted(f for f in os.listdir(ours_dir) if f.endswith(".safetensors"))
    assert len(shards) > 2 and SINGLE_FILE not in shards
    with open(os.path.join(ours_dir, INDEX_FILE)) as f:
        assert sorted(set(json.load(f)["weight_map"].values())) == shards
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours_dir, attn_implementation="eager")
    assert _max_error_at_real_tokens(_hf_logits(reloaded, tokens, mask), expected, mask) <= 1e-5
    _, params_again = load_hf(ours_dir)
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


@pytest.mark.parametrize("hf_checkpoint", ["qwen3"], indirect=True)
def test_load_onto_mesh_shards_params_and_keeps_logits(hf_checkpoint, tmp_path):
    mesh = make_mesh((2, 2, 2))
    config, params = load_hf(hf_checkpoint["path"], mesh=mesh)
    q_proj = params["layers_0"]["attn"]["q_proj"]  # [D, N, H]: D over fsdp, heads over tensor
    assert q_proj.sharding.mesh == mesh
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert q_proj.addressable_shards[0].data.shape == (32, 4, 16)
    ours = _our_logits(config, params, hf_checkpoint["tokens"], hf_checkpoint["mask"])
    assert _max_error_at_real_tokens(ours, hf_checkpoint["logits"], hf_checkpoint["mask"]) <= 1e-4

    save_hf(str(tmp_path), config, params)  # gathers the sharded arrays back to the host
    original = load_file(os.path.join(hf_checkpoint["path"], SINGLE_FILE))
    resaved = load_file(os.path.join(tmp_path, SINGLE_FILE))
    assert set(resaved) == set(original)
    for name in original:
        np.testing.assert_array_equal(resaved[name], original[name], err_msg=name)


def test_bf16_checkpoint_loads(tmp_path):
    bf16_dir, resaved_dir = str(tmp_path / "bf16"), str(tmp_path / "resaved")
    _random_hf_model("qwen3", seed=2).to(torch.bfloat16).save_pretrained(bf16_dir)
    config, params = load_hf(bf16_dir)  # keeps the checkpoint's dtype by default
    assert (config.param_dtype, config.dtype) == ("bfloat16", "bfloat16")
    assert params["embed"].dtype == jax.numpy.bfloat16

    save_hf(resaved_dir, config, params)  # bf16 in, bf16 out, bit for bit
    stored, resaved = load_file(os.path.join(bf16_dir, SINGLE_FILE)), load_file(os.path.join(resaved_dir, SINGLE_FILE))
    assert set(stored) == set(resaved)
    for name in stored:
        assert resaved[name].dtype == stored[name].dtype == np.dtype(jax.numpy.bfloat16), name
        np.testing.assert_array_equal(resaved[name].view(np.uint16), stored[name].view(np.uint16), err_msg=name)

    # Upcast on load: exact fp32 parity with transformers running the same bf16 weights in fp32.
    config32, params32 = load_hf(bf16_dir, param_dtype="float32")
    assert (config32.param_dtype, config32.dtype) == ("float32", "float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32,
                                                                  attn_implementation="eager")
    tokens, mask = _batch(seed=2)
    error = _max_error_at_real_tokens(_our_logits(config32, params32, tokens, mask),
                                      _hf_logits(reference, tokens, mask), mask)
    assert error <= 1e-4


# ---- errors, on checkpoints written by save_hf from our own random params (no torch needed) ----
@pytest.fixture
def tiny_checkpoint(tmp_path):
    config = ModelConfig.tiny()
    save_hf(str(tmp_path), config, _random_params(config))
    return str(tmp_path)


def _edit_tensors(path: str, edit) -> None:
    file = os.path.join(path, SINGLE_FILE)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named_with_its_file(tiny_checkpoint):
    _edit_tensors(tiny_checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    missing = r"'model\.layers\.1\.self_attn\.k_norm\.weight' is missing from .*model\.safetensors"
    with pytest.raises(ValueError, match=missing):
        load_hf(tiny_checkpoint)


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_checkpoint):
    _edit_tensors(tiny_checkpoint, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(65,\), expected \(64,\)"):
        load_hf(tiny_checkpoint)


def test_unexpected_tensor_rejected_but_rotary_buffers_ignored(tiny_checkpoint):
    _edit_tensors(tiny_checkpoint, lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    load_hf(tiny_checkpoint)
    _edit_tensors(tiny_checkpoint, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(4, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors .*'model\.layers\.0\.mlp\.extra\.weight'"):
        load_hf(tiny_checkpoint)


def test_tied_model_accepts_lm_head_only_if_equal_to_embedding(tmp_path):
    config = ModelConfig.tiny(tie_embeddings=True)
    params = _random_params(config, 1)
    save_hf(str(tmp_path), config, params)
    embed = np.asarray(params["embed"])
    _edit_tensors(str(tmp_path), lambda t: t.update({"lm_head.weight": embed.copy()}))
    _, loaded = load_hf(str(tmp_path))
    assert "lm_head" not in loaded
    _edit_tensors(str(tmp_path), lambda t: t.update({"lm_head.weight": embed + 1.0}))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_hf(str(tmp_path))


def test_unsupported_architecture(tiny_checkpoint):
    config_file = os.path.join(tiny_checkpoint, "config.json")
    with open(config_file) as f:
        hf_config = json.load(f)
    with open(config_file, "w") as f:
        json.dump({**hf_config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, f)
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        load_hf(tiny_checkpoint)


def test_missing_shard_file_is_named(tmp_path):
    config = ModelConfig.tiny()
    save_hf(str(tmp_path), config, _random_params(config), max_shard_bytes=50_000)
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(tmp_path / shards[-1])
    with pytest.raises(FileNotFoundError, match=shards[-1]):
        load_hf(str(tmp_path))


def test_save_hf_replaces_a_stale_single_file(tiny_checkpoint):
    config, params = load_hf(tiny_checkpoint)
    save_hf(tiny_checkpoint, config, params, max_shard_bytes=50_000)  # a left-over model.safetensors would win
    assert not os.path.exists(os.path.join(tiny_checkpoint, SINGLE_FILE))
    shards = sorted(f for f in os.listdir(tiny_checkpoint) if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with safe_open(os.path.join(tiny_checkpoint, shards[0]), framework="np") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors without it
    _, reloaded = load_hf(tiny_checkpoint)
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)


# ---- tokenizer ----
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _save_tiny_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["what is 2+2? the answer is 4.", "hello world"] * 5, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                         pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE).save_pretrained(path)


def test_load_tokenizer_applies_chat_template_offline(tmp_path):
    tokenizer_dir, model_dir = str(tmp_path / "tok"), str(tmp_path / "model")
    _save_tiny_tokenizer(tokenizer_dir)
    config = ModelConfig.tiny()
    save_hf(model_dir, config, _random_params(config), tokenizer_dir=tokenizer_dir)
    for path in (tokenizer_dir, model_dir):  # save_hf copied the tokenizer, chat template included
        tokenizer = load_tokenizer(path)
        assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "what is 2+2?"}], tokenize=False,
                                               add_generation_prompt=True)
        assert prompt == "<|im_start|>user\nwhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        ids = tokenizer.encode(prompt)
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and len(ids) < len(prompt)
        assert tokenizer.decode(ids) == prompt
        assert tokenizer.eos_token == "<|im_end|>"


def test_load_tokenizer_without_files_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
