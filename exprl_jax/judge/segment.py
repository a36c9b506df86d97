"""Splitting a response into ExpRL-Process segments at a delimiter (SPEC §4), as exact token spans.

A boundary is the token at which the decoded response first contains the next occurrence of the delimiter (the
token completing `###`, even when that token also carries neighbouring text such as `.###` or `###\n`); the
authors' code's rule (a boundary wherever the last 10 tokens decode to text ending in the delimiter) is
`variant="authors"`.
"""
from __future__ import annotations

import bisect
from typing import Callable, Sequence

import numpy as np

from exprl_jax.rewards.base import Span

# token ids → text, e.g. `lambda ids: tokenizer.decode(ids, skip_special_tokens=True)`
Decode = Callable[[list[int]], str]
REPLACEMENT_CHAR = "\ufffd"  # what byte-level decoders emit for an incomplete UTF-8 sequence
VARIANTS = ("paper", "authors")
AUTHORS_LOOKBACK = 10  # tokens the authors' code decodes to look for the delimiter


def decoded_char_ends(token_ids: Sequence[int], decode: Decode) -> tuple[str, list[int]]:
    """Returns (text, ends): text == decode(token_ids), and ends[i] = how many characters of text are complete
    once token i is read (non-decreasing; a token holding part of a multi-byte character adds nothing until the
    token that completes it).

    Incremental, as streaming detokenisers do: each step decodes a short window that starts one committed piece
    back, so decoders that treat a leading space specially still agree; O(len) decodes of short windows. If the
    pieces do not add up to the full decode (an unusual decoder), falls back to decoding every prefix.
    """
    ids = [int(t) for t in token_ids]
    full_text = decode(ids)
    pieces, length, ends = [], 0, []
    prefix_offset = read_offset = 0
    prefix_text = ""  # decode(ids[prefix_offset:read_offset]); changes only when a piece is committed
    for i in range(len(ids)):
        window_text = decode(ids[prefix_offset:i + 1])
        if len(window_text) > len(prefix_text) and not window_text.endswith(REPLACEMENT_CHAR):
            pieces.append(window_text[len(prefix_text):])
            length += len(pieces[-1])
            prefix_offset, read_offset = read_offset, i + 1
            prefix_text = decode(ids[prefix_offset:read_offset])
        ends.append(length)
    if read_offset < len(ids):  # the response ends inside a multi-byte character (or on a real U+FFFD)
        pieces.append(decode(ids[prefix_offset:])[len(prefix_text):])
        ends[-1] = length + len(pieces[-1])
    if "".join(pieces) == full_text:
        return full_text, ends
    return full_text, _prefix_char_ends(ids, decode, full_text)


def _prefix_char_ends(ids: list[int], decode: Decode, full_text: str) -> list[int]:
    """Slow exact path: ends[i] = length of the longest prefix of full_text that decode(ids[:i+1]) agrees with."""
    ends, agreed = [], 0
    for i in range(len(ids)):
        prefix = decode(ids[:i + 1])
        if prefix.startswith(full_text[:agreed]):
            limit = min(len(prefix), len(full_text))
            while agreed < limit and prefix[agreed] == full_text[agreed]:
                agreed += 1
        ends.append(agreed)
    if ends:
        ends[-1] = len(full_text)
    return ends


def segment_response(token_ids: Sequence[int], decode: Decode, delimiter: str = "###", *,
                     variant: str = "paper") -> list[Span]:
    """Splits one response (its tokens only: no prompt, no padding) into segments (SPEC §4).

    Each segment ends at a boundary token, the token whose decoded text completes an occurrence of `delimiter`
    (occurrences counted left to right without overlap, so `######` is two). The rest after the last boundary is
    the last segment; if that rest is only whitespace or decodes to nothing (a newline, an end-of-text token), it
    joins the segment before it rather than forming a content-free step for the judge to score. Spans are
    half-open token ranges covering [0, len) with no gaps; `Span.text` is the matching slice of the decoded
    response, so the texts concatenate to decode(token_ids). An empty response has no segments.

    variant="authors" is the authors' code: a boundary at every token i whose window of the last 10 tokens,
    decode(ids[i−9 : i+1]), ends with `delimiter`; the rest after the last boundary, if any, is the last segment
    whatever it holds. So `###` then `#` gives an extra one-token segment, a single `###\n` token gives no
    boundary, and a whitespace or EOS-only tail is a segment of its own. `Span.text` is then decode(span tokens),
    what the code sends to the judge.
    """
    if not delimiter:
        raise ValueError("the segment delimiter must be non-empty")
    if variant not in VARIANTS:
        raise ValueError(f"unknown segmentation variant {variant!r}; expected one of {VARIANTS}")
    if len(token_ids) == 0:
        return []
    if variant == "authors":
        return _authors_segments([int(t) for t in token_ids], decode, delimiter)
    text, ends = decoded_char_ends(token_ids, decode)
    cuts: list[int] = []  # exclusive token end of each segment
    found = text.find(delimiter)
    while found != -1:
        delimiter_end = found + len(delimiter)
        boundary = bisect.bisect_left(ends, delimiter_end)  # first token whose text reaches the delimiter's end
        if not cuts or boundary + 1 > cuts[-1]:  # one token may complete several occurrences
            cuts.append(boundary + 1)
        found = text.find(delimiter, delimiter_end)
    n = len(ends)
    if not cuts:
        cuts = [n]
    elif cuts[-1] < n:
        rest = text[ends[cuts[-1] - 1]:]
        if rest.strip():
            cuts.append(n)
        else:
            cuts[-1] = n
    spans, start = [], 0
    for end in cuts:
        char_start = ends[start - 1] if start else 0
        spans.append(Span(text=text[char_start:ends[end - 1]], start=start, end=end))
        start = end
    return spans


def _authors_segments(ids: list[int], decode: Decode, delimiter: str) -> list[Span]:
    cuts = [i + 1 for i in range(len(ids))
            if decode(ids[max(0, i + 1 - AUTHORS_LOOKBACK):i + 1]).endswith(delimiter)]
    if not cuts or cuts[-1] < len(ids):
        cuts.append(len(ids))
    starts = [0] + cuts[:-1]
    return [Span(text=decode(ids[start:end]), start=start, end=end) for start, end in zip(starts, cuts)]


def segment_batch(token_ids_NT: Sequence[Sequence[int]] | np.ndarray, lengths_N: Sequence[int] | np.ndarray,
                  decode: Decode, delimiter: str = "###", *, variant: str = "paper") -> list[list[Span]]:
    """segment_response for each of N right-padded responses; row i's response is token_ids_NT[i][:lengths_N[i]]."""
    if len(token_ids_NT) != len(lengths_N):
        raise ValueError(f"{len(token_ids_NT)} responses but {len(lengths_N)} lengths")
    return [segment_response(list(row[:int(length)]), decode, delimiter, variant=variant)
            for row, length in zip(token_ids_NT, lengths_N)]

