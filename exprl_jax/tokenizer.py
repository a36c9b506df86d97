"""Tokenizers: a built-in character vocabulary (tests, the CPU testbed) or a Hugging Face tokenizer directory.

Both are `transformers.PreTrainedTokenizerFast`, so the rest of the code sees one API (encode/decode, eos/pad ids,
chat templates) and a character-level checkpoint saves and loads like any HF model.
"""
from __future__ import annotations

import os
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3
CHAR_VOCAB = string.digits + string.ascii_letters + string.punctuation + " \n"


def char_tokenizer(chars: str = CHAR_VOCAB) -> PreTrainedTokenizerFast:
    """One token per character; <pad>=0, <eos>=1, <bos>=2, <unk>=3, then `chars` in order."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character is a word
    tok.decoder = decoders.Fuse()  # join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def load_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """"char" for the built-in vocabulary, else a local directory holding tokenizer.json (offline)."""
    if spec == "char":
        return char_tokenizer()
    if not os.path.isfile(os.path.join(spec, "tokenizer.json")):
        raise FileNotFoundError(f"tokenizer: {spec!r} is not 'char' and has no tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(spec, local_files_only=True)


def eos_ids(tokenizer) -> tuple[int, ...]:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; generation could never stop")
    return (int(tokenizer.eos_token_id),)


def pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
