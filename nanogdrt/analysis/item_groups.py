"""Fig. 3 / 8 and Fig. 4 / 9 (GDRT §4.3): which item groups do a model's top-1 recommendations fall in?

Item groups are the metrics' (§4.1.4, nanogdrt/grouping.py item_groups): N_ITEM_GROUPS equal-size
groups by Eq. 2 item relevance, group 1 the items most predictable from auxiliary tokens alone.
Both figures are read from the runs' results.json; no model is loaded:

    Fig. 3 / 8   the item-group distribution of the top-1 test recommendations of each run, beside
                 that of the test targets (results.json: test.top1_group_distribution,
                 test_target_group_distribution)
    Fig. 4 / 9   the share of top-1 validation recommendations in item group 1, after each epoch
                 (results.json: epochs[].top1_group1_share); a model that leans on auxiliary tokens
                 drifts towards group 1
"""

from nanogdrt.analysis import plots
from nanogdrt.analysis.inputs import Run
from nanogdrt.grouping import N_ITEM_GROUPS


def _targets(runs: list[Run]) -> tuple[dict, bool]:
    """label -> the test targets' group distribution, and whether every run has the same one."""
    dists = {r.label: r.results["test_target_group_distribution"] for r in runs}
    return dists, all(d == dists[runs[0].label] for d in dists.values())


def top1_groups(runs: list[Run], path) -> dict:
    """Fig. 3 into `path`; returns analysis.json's "top1_group_distribution" entry: bar label -> distribution."""
    dists, same = _targets(runs)
    bars = {"test targets": dists[runs[0].label]} if same else {f"test targets ({k})": d for k, d in dists.items()}
    bars |= {f"{r.label} top-1": r.results["test"]["top1_group_distribution"] for r in runs}
    plots.group_distribution(bars, path, title="Item groups of the top-1 recommendations vs the test targets")
    return bars


def group1_share(runs: list[Run], path) -> dict:
    """Fig. 4 into `path`; returns analysis.json's "group1_share_by_epoch" entry: label -> epochs and shares."""
    dists, same = _targets(runs)
    curves = {r.label: ([e["epoch"] for e in r.results["epochs"]],
                        [e["top1_group1_share"] for e in r.results["epochs"]]) for r in runs}
    reference = (dists[runs[0].label][0], "group-1 share of the test targets") if same else None
    plots.epoch_curves(curves, path, "share of top-1 recommendations\nin item group 1 (validation)",
                       "Top-1 recommendations from the item group most predictable\n"
                       f"from auxiliary tokens (group 1 of {N_ITEM_GROUPS}), after each epoch", reference)
    return {k: {"epoch": x, "share": y} for k, (x, y) in curves.items()}
