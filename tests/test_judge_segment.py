"""Process segmentation (SPEC §4) on real byte-level BPE tokenizers trained here, where `###` is split across tokens
or merged with its neighbours (`.###`, `###\\n`) and multi-byte characters span several tokens."""
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from exprl_jax.judge.segment import decoded_char_ends, segment_batch, segment_response
from exprl_jax.rewards.base import Span


def _corpus(seed=0, documents=200):
    """Varied step-by-step text: frequent enough for `.###\\n` / `###\\n` merges, too varied for whole sentences."""
    rng = random.Random(seed)
    words = "let then so we try check gives sum over and the answer is value step next compute".split()
    ends = [".###\n", "###\n", ".### ", "###"]

    def step():
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        return f"{sentence} {rng.randint(0, 99)}{rng.choice(ends)}"
    return ["".join(step() for _ in range(6)) + "∑ é 😀" for _ in range(documents)]


CORPUS = _corpus()
SAMPLES = [
    "Step 1: let x = 3.###\nStep 2: then y = x + 2 = 5.###\nSo the answer is \\boxed{5}.###\n",
    "We try n = 4.###\nCheck: 4 * 4 = 16.###\n∑ over é and 😀 gives 7.###\nDone.",
    "no delimiter at all, ∑ é 😀",
    "###leading delimiter and ###### a double one### then text",
    "ends inside a delimiter ##",
    "é###😀###∑",
    "   ",
]


def _byte_level_bpe(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # No pre-tokenizer regex: merges may cross punctuation and newlines, so `.###` and `###\n` become tokens.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def merged():
    return _byte_level_bpe(vocab_size=350)


@pytest.fixture(scope="module")
def bytes_only():
    return _byte_level_bpe(vocab_size=256)  # the byte alphabet, no merges: `###` is three tokens, `😀` four


def _oracle_cuts(ids, decode, delimiter="###"):
    """Independent reference: decode every prefix, a boundary wherever the count of delimiters grows; then the
    remainder rule (a whitespace-only tail joins the last segment)."""
    cuts, seen = [], 0
    for i in range(len(ids)):
        count = decode(ids[:i + 1]).rstrip("\ufffd").count(delimiter)
        if count > seen:
            cuts.append(i + 1)
            seen = count
    if not ids:
        return []
    if not cuts:
        return [len(ids)]
    if cuts[-1] < len(ids):
        if decode(ids[cuts[-1]:]).strip():
            cuts.append(len(ids))
        else:
            cuts[-1] = len(ids)
    return cuts


def _check_spans(spans, ids, decode, delimiter="###"):
    full_text = decode(ids)
    assert "".join(span.text for span in spans) == full_text
    assert [span.start for span in spans] == [0] + [span.end for span in spans[:-1]]  # no gaps, no overlaps
    assert spans[-1].end == len(ids)
    assert [span.end for span in spans] == _oracle_cuts(ids, decode, delimiter)
    for span in spans:
        assert span.start < span.end
        assert decode(ids[span.start:span.end]) == span.text  # spans fall on character boundaries here


@pytest.mark.parametrize("text", SAMPLES)
def test_segments_on_merged_bpe(merged, text):
    ids = merged.encode(text).ids
    _check_spans(segment_response(ids, merged.decode), ids, merged.decode)


@pytest.mark.parametrize("text", SAMPLES)
def test_segments_on_byte_bpe(bytes_only, text):
    ids = bytes_only.encode(text).ids
    _check_spans(segment_response(ids, bytes_only.decode), ids, bytes_only.decode)


def test_merged_tokenizer_really_merges_the_delimiter_with_neighbours(merged):
    """Guards the test above: the boundary tokens carry more than `###`, e.g. `.###` or `###\\n`."""
    ids = merged.encode(SAMPLES[0]).ids
    spans = segment_response(ids, merged.decode)
    boundary_tokens = [merged.decode([ids[span.end - 1]]) for span in spans]
    assert len(spans) == 3
    assert all("#" in token for token in boundary_tokens)
    assert any(token.strip("#") for token in boundary_tokens), boundary_tokens
    assert spans[0].text == "Step 1: let x = 3.###" + ("\n" if boundary_tokens[0].endswith("\n") else "")


def test_split_delimiter_boundary_is_the_token_completing_it(bytes_only):
    # bytes: é = 2 tokens, 😀 = 4, ∑ = 3; the boundary is the third `#`, not the first or second.
    ids = bytes_only.encode("é###😀###∑").ids
    assert len(ids) == 2 + 3 + 4 + 3 + 3
    spans = segment_response(ids, bytes_only.decode)
    assert spans == [Span("é###", 0, 5), Span("😀###", 5, 12), Span("∑", 12, 15)]


def test_remainder_rules(bytes_only):
    decode = bytes_only.decode
    ids = bytes_only.encode("a###\n \n").ids  # whitespace tail joins the last segment
    assert segment_response(ids, decode) == [Span("a###\n \n", 0, len(ids))]
    ids = bytes_only.encode("a###b").ids  # a real remainder is its own segment
    assert segment_response(ids, decode) == [Span("a###", 0, 4), Span("b", 4, 5)]
    ids = bytes_only.encode("abc").ids  # no delimiter: one segment
    assert segment_response(ids, decode) == [Span("abc", 0, 3)]
    assert segment_response([], decode) == []
    ids = bytes_only.encode("######").ids  # two non-overlapping occurrences
    assert segment_response(ids, decode) == [Span("###", 0, 3), Span("###", 3, 6)]
    ids = bytes_only.encode("a<d>b<d>").ids  # another delimiter
    assert segment_response(ids, decode, delimiter="<d>") == [Span("a<d>", 0, 4), Span("b<d>", 4, 8)]
    with pytest.raises(ValueError):
        segment_response(ids, decode, delimiter="")


def test_incremental_decoding_uses_linear_decodes_of_short_windows(merged):
    ids = merged.encode(" ".join(SAMPLES) * 20).ids
    windows = []

    def counting_decode(token_ids):
        windows.append(len(token_ids))
        return merged.decode(token_ids)

    text, ends = decoded_char_ends(ids, counting_decode)
    assert text == merged.decode(ids)
    assert len(windows) <= 2 * len(ids) + 2  # O(len) decodes ...
    assert sorted(windows)[-2] <= 8  # ... and apart from the one full decode, each of a few tokens
    assert ends == sorted(ends) and ends[-1] == len(text)


def test_a_decoder_that_is_not_concatenation_consistent_falls_back_to_prefixes(bytes_only):
    def bracketed(token_ids):  # pieces decoded this way would not add up to the whole
        return "[" + bytes_only.decode(token_ids) + "]"

    ids = bytes_only.encode("a###b").ids
    spans = segment_response(ids, bracketed)
    assert "".join(span.text for span in spans) == "[a###b]"
    assert [(span.start, span.end) for span in spans] == [(0, 4), (4, 5)]


def test_segment_batch_respects_lengths(bytes_only):
    rows = [bytes_only.encode("a###b").ids, bytes_only.encode("cd###").ids, []]
    width = max(len(r) for r in rows) + 3
    pad = 0
    token_ids_NT = np.array([r + [pad] * (width - len(r)) for r in rows])
    lengths_N = np.array([len(r) for r in rows])
    segments = segment_batch(token_ids_NT, lengths_N, bytes_only.decode)
    assert segments == [[Span("a###", 0, 4), Span("b", 4, 5)], [Span("cd###", 0, 5)], []]
    with pytest.raises(ValueError):
        segment_batch(token_ids_NT, lengths_N[:2], bytes_only.decode)


# ---------------------------------------------------------------- variant="authors" (the authors' code's rule)
# A small tokenizer with a hand-picked vocabulary, so every tokenisation below is exact. "<eos>" is a special
# token: it decodes to "" as under skip_special_tokens=True.
VOCAB = ["a", "b", "###", "#", "##", "###\n", "\n", " ", "<eos>", ".###", "x###y", "######"]


def _ids(*pieces):
    return [VOCAB.index(p) for p in pieces]


def _vocab_decode(ids):
    return "".join("" if VOCAB[i] == "<eos>" else VOCAB[i] for i in ids)


def _cuts(spans):
    return [(span.start, span.end, span.text) for span in spans]


@pytest.mark.parametrize(
    "pieces, paper, authors",
    [
        # `###` then `#`: the authors' window "a####" still ends with ### at token 2, an extra one-token segment.
        # The paper's rule sees one occurrence (chars 1-3), completed by token 1; "#b" is the last segment.
        (("a", "###", "#", "b"), [(0, 2, "a###"), (2, 4, "#b")],
         [(0, 2, "a###"), (2, 3, "#"), (3, 4, "b")]),
        # `######` in one-character tokens: the window ends with ### at tokens 2, 3, 4, 5: four segments.
        # The paper's rule: two non-overlapping occurrences, completed by tokens 2 and 5.
        (("#",) * 6, [(0, 3, "###"), (3, 6, "###")],
         [(0, 3, "###"), (3, 4, "#"), (4, 5, "#"), (5, 6, "#")]),
        # `######` as `###`, `##`, `#`: boundaries at every token, three segments (SPEC §4's "three").
        (("###", "##", "#"), [(0, 1, "###"), (1, 3, "###")],
         [(0, 1, "###"), (1, 2, "##"), (2, 3, "#")]),
        # `######` as `##`, `##`, `##`: the window ends with ### after token 1 ("####") and token 2.
        (("##", "##", "##"), [(0, 2, "####"), (2, 3, "##")], [(0, 2, "####"), (2, 3, "##")]),
        # one `######` token: one boundary under both rules (one token completes both occurrences).
        (("a", "######", "b"), [(0, 2, "a######"), (2, 3, "b")], [(0, 2, "a######"), (2, 3, "b")]),
        # a single `###\n` token: its window ends with "\n", so the authors' rule finds no boundary at all.
        (("a", "###\n", "b"), [(0, 2, "a###\n"), (2, 3, "b")], [(0, 3, "a###\nb")]),
        # the delimiter inside a token ("x###y"): no window ends with ###; the paper's rule cuts after it.
        (("a", "x###y", "b"), [(0, 2, "ax###y"), (2, 3, "b")], [(0, 3, "ax###yb")]),
        # a whitespace tail: its own segment for the authors, joined to the last one by the paper's rule.
        (("a", "###", "\n", " "), [(0, 4, "a###\n ")], [(0, 2, "a###"), (2, 4, "\n ")]),
        # an EOS tail: decoded without specials the window "a###" still ends with ###, so EOS is a one-token
        # segment "" (the code, decoding "<eos>" in its window, gets the same span as a remainder).
        (("a", "###", "<eos>"), [(0, 3, "a###")], [(0, 2, "a###"), (2, 3, "")]),
        # `###` split across tokens, and merged with the text before it: both rules agree.
        (("a", "##", "#", "b"), [(0, 3, "a###"), (3, 4, "b")], [(0, 3, "a###"), (3, 4, "b")]),
        (("a", ".###", "b", "###"), [(0, 2, "a.###"), (2, 4, "b###")], [(0, 2, "a.###"), (2, 4, "b###")]),
        # no delimiter: one segment under both.
        (("a", "b"), [(0, 2, "ab")], [(0, 2, "ab")]),
    ],
)
def test_authors_and_paper_boundaries_on_exact_tokenisations(pieces, paper, authors):
    ids = _ids(*pieces)
    assert _cuts(segment_response(ids, _vocab_decode)) == paper
    assert _cuts(segment_response(ids, _vocab_decode, variant="authors")) == authors


def test_authors_rule_matches_character_oracle_on_random_strings():
    # One token per character: the last-10-tokens window ends with ### exactly when the text up to that token
    # does, so boundaries are {i : text[:i+1].endswith("###")} and every non-empty rest is the last segment.
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("#ab \n") for _ in range(rng.randint(1, 30)))
        ids = [ord(c) for c in text]
        cuts = [i + 1 for i in range(len(text)) if text[:i + 1].endswith("###")]
        if not cuts or cuts[-1] < len(text):
            cuts.append(len(text))
        spans = segment_response(ids, lambda t: "".join(map(chr, t)), variant="authors")
        assert [s.end for s in spans] == cuts
        assert "".join(s.text for s in spans) == text


def test_authors_window_is_ten_tokens(bytes_only):
    # The delimiter must end the decoded last 10 tokens; a long token-by-token prefix does not matter.
    ids = bytes_only.encode("x" * 25 + "###" + "y" * 12 + "###").ids
    spans = segment_response(ids, bytes_only.decode, variant="authors")
    assert [(s.start, s.end) for s in spans] == [(0, 28), (28, 43)]


@pytest.mark.parametrize("text", [t for t in SAMPLES if "######" not in t])  # `######`: exact cases above
def test_authors_rule_on_merged_bpe(merged, text):
    """On the trained tokenizer the authors' boundaries are the paper's boundaries whose token ends the text at
    `###` (`.###`, `###`); those merged with what follows (`###\n`, `.### `) are missed; a rest is a segment."""
    ids = merged.encode(text).ids
    paper = segment_response(ids, merged.decode)
    authors = segment_response(ids, merged.decode, variant="authors")
    kept = {s.end for s in paper if merged.decode(ids[:s.end]).endswith("###")}
    assert [s.end for s in authors] == sorted(kept | {len(ids)})
    assert [s.text for s in authors] == [merged.decode(ids[s.start:s.end]) for s in authors]


def test_merged_bpe_sample_loses_every_boundary_under_the_authors_rule(merged):
    # SAMPLES[0] ends each step with `.###\n`, which this tokenizer merges: the authors' rule sees one segment.
    ids = merged.encode(SAMPLES[0]).ids
    assert len(segment_response(ids, merged.decode)) == 3
    assert _cuts(segment_response(ids, merged.decode, variant="authors")) == [(0, len(ids), SAMPLES[0])]


def test_segment_batch_passes_the_variant(bytes_only):
    ids = bytes_only.encode("a####").ids
    rows = np.array([ids + [0, 0]])
    assert len(segment_batch(rows, [len(ids)], bytes_only.decode)[0]) == 2  # "a###", "#"
    assert len(segment_batch(rows, [len(ids)], bytes_only.decode, variant="authors")[0]) == 2
    assert [s.end for s in segment_batch(rows, [len(ids)], bytes_only.decode, variant="authors")[0]] == [4, 5]
    with pytest.raises(ValueError, match="variant"):
        segment_response(ids, bytes_only.decode, variant="verl")
