"""Fig. 5 (GDRT §2.2): do target tokens co-occur more reliably with auxiliary tokens than with interactions?

The definition. The paper's point: target tokens co-occur with auxiliary tokens far more
reliably than with interaction tokens, so an NLL-minimising model learns to predict from the former.
Every training example n contributes its target tokens y_t (the quoted title and EOS, the tokens
the loss trains on). For a target occurrence (n, t), its context tokens of each type are the set of
distinct ids in

    task         the task description (head + tail of the prompt)
    prefix       the already generated part of the target, y_<t
    interaction  the history titles

A pair (c, y) of a type co-occurs once per target occurrence of y whose context of that type holds
c. Two rates per pair, each read in one direction:

    P(c | y) = #co-occurrences(c, y) / #occurrences(y)          "given_target"
        how reliably c is present when the model is trained to produce y (1: every time);
    P(y | c) = #co-occurrences(c, y) / #occurrences with c in that context   "given_context"
        how well c predicts y, i.e. how useful c is as a shortcut to y.

Fig. 5 shows, per type, the mean of each rate over the distinct pairs of that type whose c and y
are each counted at least `min_count` times (default 5; a token seen once makes every pair it is
in look certain). Task tokens are in every prompt, so P(c | y) = 1 for all task pairs while
P(y | c) is just y's frequency: they carry the prior over titles. Prefix tokens are the title
itself, so they predict its next tokens well. Reported as measured, whatever the data shows.
"""

from collections import Counter

import numpy as np

from nanogdrt.analysis import plots
from nanogdrt.batches import make_examples
from nanogdrt.prompt import PromptIds

PAIR_TYPES = ("task", "prefix", "interaction")
DEFINITION = ("per type, mean / median over distinct (context token c, target token y) pairs, c and y each "
              "counted >= min_count times, of P(c | y) and P(y | c) over target-token occurrences "
              "(nanogdrt/analysis/cooccurrence.py docstring)")


def cooccurrence_counts(examples: list[PromptIds]):
    """Counts over all target occurrences (docstring): per type, {(c, y): co-occurrences} and
    {c: occurrences whose context holds c}; and {y: occurrences of y as a target token}."""
    pairs, n_context = ({k: Counter() for k in PAIR_TYPES} for _ in range(2))
    n_target = Counter()
    for p in examples:
        t0, t1 = p.target
        task = {p.ids[i] for s, e in p.task for i in range(s, e)}
        interaction = {p.ids[i] for s, e in p.items for i in range(s, e)}
        target = p.ids[t0:t1]
        for t, y in enumerate(target):
            n_target[y] += 1
            for kind, context in (("task", task), ("prefix", set(target[:t])), ("interaction", interaction)):
                n_context[kind].update(context)
                pairs[kind].update((c, y) for c in context)
    return pairs, n_context, n_target


def cooccurrence_rates(examples: list[PromptIds], min_count: int = 5) -> dict:
    """Per pair type, over its distinct pairs (c, y) with c and y each seen >= min_count times:
    mean / median of P(c | y) ("given_target") and of P(y | c) ("given_context"), and the count."""
    pairs, n_context, n_target = cooccurrence_counts(examples)
    out = {}
    for kind in PAIR_TYPES:
        kept = [(n, c, y) for (c, y), n in pairs[kind].items()
                if n_target[y] >= min_count and n_context[kind][c] >= min_count]
        given_target = np.array([n / n_target[y] for n, c, y in kept])
        given_context = np.array([n / n_context[kind][c] for n, c, y in kept])
        out[kind] = {"pairs": len(kept)}
        for name, rates in (("given_target", given_target), ("given_context", given_context)):
            out[kind][name] = {"mean": float(rates.mean()) if kept else float("nan"),
                               "median": float(np.median(rates)) if kept else float("nan")}
    return out


def figure(builder, dataset, min_count: int, path) -> dict:
    """Fig. 5 into `path` from the training examples of `dataset` (a RecDataset, the runs' training
    set); returns analysis.json's "cooccurrence" entry."""
    train_examples = make_examples(builder, dataset.train, dataset.titles)
    rates = cooccurrence_rates(train_examples, min_count)
    plots.cooccurrence_bars({k: (v["given_target"]["mean"], v["given_context"]["mean"]) for k, v in rates.items()},
                            {k: v["pairs"] for k, v in rates.items()}, path, len(train_examples), min_count)
    return {"definition": DEFINITION, "train_examples": len(train_examples), "types": rates}
