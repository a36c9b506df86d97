"""Hand-made trace -> score examples of every rule of the programmatic judge (`programmatic.py`), one problem.

Problem: a=3;b=a+4;c=b-1;d=c+a;e=d+2;find c,d,e. Checkpoints b=7, c=6, d=9, e=1 (4 of them, so progress 3 is
3/4 and 2 is 1/2); answer 691. The suite checks every row through the real reward path (`tests/test_judge_rules.py`).
"""
PROBLEM = "a=3;b=a+4;c=b-1;d=c+a;e=d+2;find c,d,e"
REFERENCE = "b=7, c=6\nd=9, e=1\nso c,d,e give \\boxed{691}"  # the terse reference: results only
B, C, D, E = "b=a+4=3+4=7###", "c=b-1=7-1=6###", "d=c+a=6+3=9###", "e=d+2=9+2=1###"
NATIVE = B + C + D + E + "\\boxed{691}"

# (trace, level, the rule it shows)
OUTCOME = (
    (NATIVE, 5, "every checkpoint and the reference's answer"),
    (REFERENCE, 5, "the reference itself, in another style"),
    (B + C + D + "\\boxed{691}", 4, "the answer, progress 3/4, a trivial gap (e not written)"),
    (B + C + D + "e=d+2=9+2=2###\\boxed{692}", 3, "progress 3/4, then a wrong step and a different answer"),
    (B + C + D + E + "\\boxed{690}", 3, "all four checkpoints but a different answer: capped at 3"),
    (B + C + D + E, 3, "all four checkpoints, no answer: not 'correct'"),
    (B + C + "d=c+a=6+3=8###e=d+2=8+2=0###\\boxed{680}", 2, "progress 1/2, then wrong"),
    (B + "c=b-1=7-1=5###d=c+a=5+3=8###e=d+2=8+2=0###\\boxed{580}", 1, "wrong at the second step: progress 1/4"),
    ("b=a+4=3+4=8###" + C + D + E + "\\boxed{691}", 1,
     "the first checkpoint contradicted: nothing after it is progress, even with the right answer"),
    ("\\boxed{691}", 1, "a bare answer: verify, not solve"),
    ("b=1,b=2,b=3,b=4,b=5,b=6,b=7,b=8,b=9,b=0;c=1,c=2,c=3,c=4,c=5,c=6,c=7,c=8,c=9,c=0###\\boxed{691}", 1,
     "listing values: a checkpoint given two different values is contradicted"),
    (NATIVE + "###b=5", 1, "a later second value for b contradicts the first checkpoint"),
    ("", 1, "empty"),
    ("Score: 5", 1, "a fake score line is text like any other"),
)

PROCESS_SEGMENT = (  # the step alone (the authors' code)
    (B, 5, "establishes a checkpoint"),
    ("c=6", 5, "a checkpoint without the working is still the checkpoint"),
    ("c=b-1=7-1=5###", 1, "a wrong value"),
    ("b=7,b=8###", 1, "two values for one checkpoint"),
    ("\\boxed{691}", 5, "the reference's final answer"),
    ("\\boxed{692}", 1, "a different final answer"),
    ("a=3###", 2, "restates a given constant: no checkpoint, no progress credit"),
    ("Let's go step by step###", 2, "generic text: no progress credit"),
    ("Score: 5###", 2, "a fake score line: no progress credit"),
)

PROCESS_PREFIX = (  # y_<=t: the response from its start through step t (the paper's equation)
    (B, 5, "a clean prefix that establishes a checkpoint"),
    (B + C, 5, "two checkpoints, nothing wrong so far"),
    (B + "Let me check that again###", 5, "a step with no new checkpoint leaves the state (and score) unchanged"),
    (B + "c=b-1=7-1=5###", 1, "the latest step is wrong"),
    ("b=a+4=3+4=8###" + C, 1, "an earlier error counts against every later prefix"),
    (B + D, 4, "clean, with a gap: c skipped"),
    ("\\boxed{691}", 1, "a bare answer establishes nothing"),
    (B + C + "\\boxed{691}", 5, "a right answer without its derivation adds nothing: the state stays 5"),
    (NATIVE, 5, "a right final answer after the whole derivation"),
    (B + C + D + E + "\\boxed{692}", 1, "a different final answer"),
    ("Let's start###", 1, "nothing established yet"),
)

EXACT_STEP = (  # segments -> per-step reward of the positive control (exact_step_scores)
    ((B, C, D, E, "\\boxed{691}"), (1, 1, 1, 1, 1), "the exact trace: every step earns 1"),
    ((B, "c=b-1=7-1=5###", "d=c+a=5+3=8###", "e=d+2=8+2=0###", "\\boxed{580}"), (1, 0, 0, 0, 0),
     "a wrong step and everything after it earn 0"),
    ((B, "hmm###", C, D, E, "\\boxed{691}"), (1, 0, 1, 1, 1, 1), "a step with no new checkpoint earns 0"),
    ((B, C), (1, 0), "stopping early: the last step earns 1 only for the exact trace"),
    ((B, D, E, "\\boxed{691}"), (1, 0, 0, 0), "a gap (c skipped) earns nothing after it"),
)
