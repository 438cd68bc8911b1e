"""The controlled world's sweep (docs/controlled/plan.md): `python -m experiments.controlled --list`.

Layers, each importing only the ones above it in this list (and nanogdrt):
    settings.py    the plan's constants: knob values, seeds, grid, budget; row and folder names
    rules.py       the plan's rules on committed JSON: the (G, tau) selection, the pilot's gate
    measures.py    one run's measures (accuracy against the truth, shortcut share, MGU/DGU, reliance,
                   attribution, the top-1 curve over training steps)
    summary.py     the committed measures read back, seed means and t-intervals, the figures
    report.py      docs/controlled/results.md: P1-P4 with Holm, S1-S3, per-setting tables
    plan.py        every stage as plain commands, and when it is done
    runner.py      runs the stages (__main__.py: `python -m experiments.controlled`)
It imports no other harness (tests/test_layers.py).
"""
