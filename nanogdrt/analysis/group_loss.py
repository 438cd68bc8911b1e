"""Fig. 6 (GDRT §4.3): the training loss of each token group, step by step.

Token groups are §3.2's (nanogdrt/grouping.py): target tokens split into G groups by their Eq. 3
relevance to the auxiliary tokens, group 1 the most relevant. Each line is a group's mean NLL L(g),
the quantity GDRT's objective weighs (Eq. 4; its closed form, Lemma 1 = Eq. 5, in nanogdrt/loss.py).
Read from the runs' results.json (steps[].group_loss), no model is loaded.
"""

from nanogdrt.analysis import plots
from nanogdrt.analysis.inputs import Run


def figure(runs: list[Run], path) -> dict:
    """Fig. 6 into `path`; returns analysis.json's "group_loss" entry: label -> steps and per-group losses."""
    # A group absent from a step's batch was logged as 0: it is missing, not a zero loss.
    panels = {r.label: ([s["step"] for s in r.results["steps"]],
                        [[v if v != 0 else float("nan") for v in s["group_loss"]] for s in r.results["steps"]])
              for r in runs}
    window = max(1, max(len(x) for x, _ in panels.values()) // 50)   # smooth over ~1/50 of the run
    plots.group_loss_panels(panels, path, window)
    return {k: {"step": x, "group_loss": y} for k, (x, y) in panels.items()}
