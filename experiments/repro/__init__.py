"""Reproduction v2 on real Toy (docs/results.md): `python -m experiments.repro --data-dir ../shared/data/toy --list`.

Layers, each importing only the ones above it in this list (and nanogdrt):
    rows.py        vocabulary: row names, the grid spec, the metric columns, THE row selection
    data.py        the dataset, the models, the committed rows as users; the groups / decode stages
    primary.py     the pre-registered primary family (docs/repro_v3_plan.md): Holm, TOST, seed pairing
    robust.py, normaliser.py     report sections (seeds, grid, control; the decoding's softmax)
    figures.py     PNG + JSON from the committed rows
    report.py      docs/results.md; the report / figures stages
    plan.py        every stage as one plain command, and when it is done
    runner.py      runs the stages (__main__.py: `python -m experiments.repro`)
The statistics (bootstrap, paired differences, verdicts, Welch) are nanogdrt/stats.py's; the tests
behind corrected claims (p-values, Holm, TOST) nanogdrt/inference.py's.
"""
