"""Before training GDRT on a dataset: what its token groups hold, and where Eq. 5 will put the weight.

    python -m tools.token_groups --dataset toy --data-dir ../shared/data/toy --groups 5
    python -m tools.token_groups <any train.py options> --taus 0.2,0.5,1,2,5 --json groups.json

It takes train.py's options and builds the very token groups train.py would, the same way
(relevance.dataset_groups: Eq. 3 under the base model, with the history replaced by "N/A"; 1-D
k-means; group 1 = the highest relevance to the auxiliary tokens, G = the lowest), and prints for
each group:
  - its tokens, their mean Eq. 3 relevance, their position in the target (opening quote, first
    title token, later title tokens, closing quote, EOS) and its most frequent tokens;
  - L(g), the base model's mean NLL of the group's tokens *with* the history: the group losses of
    GDRT's first step, over the whole training sample;
  - Q(g) = softmax(L(g) / tau) for each --taus (Eq. 5), and its effective number of groups
    exp(H(Q)).

Why. On Toy, GDRT's fairness gain follows the loss weight that lands on the last group
(docs/results.md, "Dose and response"), and that group is led by brand names and first title
tokens: the words a model can only get from the user's history. On a dataset where GDRT did not
help, this table says within minutes (no training) whether its last group holds something else,
and how one-hot Q starts. One step's Q uses that step's batch only, so it is noisier than the Q
of the whole sample printed here; training then lowers the groups' losses unevenly.
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from nanogdrt import files, relevance, synthetic
from nanogdrt.baselines.methods import TargetLoss
from nanogdrt.batches import collate, make_examples
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.infra import validate
from nanogdrt.infra.config import parse_args
from nanogdrt.llama import Llama
from nanogdrt.loss import GroupTotals, group_sums_and_counts, group_weights
from nanogdrt.prompt import PromptBuilder
from nanogdrt.stats import group_composition, q_entropy, token_cell
from nanogdrt.tokenizer import Tokenizer


def group_totals(model, examples, token_groups, n_groups, pad_id, device, batch_size=8):
    """(G,) NLL sums and token counts of each group's target tokens under `model`, the history in
    the prompt: the totals Eq. 5 takes, over the whole training sample instead of one batch."""
    net, sums, counts = TargetLoss(model), torch.zeros(n_groups), torch.zeros(n_groups)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))   # little padding
    with torch.no_grad():
        for s in tqdm(range(0, len(order), batch_size), desc="L(g) under the base model", unit="batch"):
            ids, mask, groups = collate(examples, token_groups, order[s:s + batch_size], pad_id, device)
            t = group_sums_and_counts(net(ids, mask).nll, groups[mask], n_groups)
            sums, counts = sums + t.sums.cpu(), counts + t.counts.cpu()
    return sums, counts


def load(cfg):
    """The dataset, base model, tokenizer and prompt builder that train.py loads for `cfg`."""
    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, train_file=cfg.train_file,
                           train_samples=cfg.train_samples, valid_samples=cfg.valid_users,
                           test_samples=cfg.test_users, seed=cfg.seed, skip_bad=cfg.skip_bad,
                           synthetic=synthetic.config_for(cfg.dataset, cfg.synthetic_size))
    model_dir = Path(cfg.model) if cfg.model else ensure_embedded_checkpoint()
    model = Llama.from_pretrained(model_dir, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    tokenizer = Tokenizer(model_dir)
    print(f"{cfg.dataset}: {len(dataset.titles)} items, {len(dataset.train)} train windows; model {model_dir}")
    return dataset, model, tokenizer, PromptBuilder(tokenizer, dataset.name)


def temperatures(text: str) -> list[float]:
    """--taus: comma-separated numbers above 0 (argparse names the flag in any error)."""
    one = validate.number(float, above=0)
    return [one(x) for x in text.split(",")]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    mine = argparse.ArgumentParser(add_help=False)
    mine.add_argument("--taus", type=temperatures, default="0.2,0.5,1,2,5",
                      help="Eq. 5 temperatures to show Q(g) at (comma-separated)")
    mine.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    own, rest = mine.parse_known_args(argv)
    if own.json:
        validate.check_output(mine, own.json, "file")          # before the minutes of scoring
    if "-h" in rest or "--help" in rest:
        print(__doc__.split("\n\n")[0] + "\n\nThis script's options (all of train.py's options follow):")
        print("  --taus TAUS  Eq. 5 temperatures to show Q(g) at (default 0.2,0.5,1,2,5)")
        print("  --json FILE  also write the numbers to FILE\n")
    cfg = parse_args(rest, "train.py's options (only the data, model and grouping ones are used here)")
    dataset, model, tokenizer, builder = load(cfg)
    token_groups, _, token_rel = relevance.dataset_groups(model, builder, dataset, cfg.groups, cfg.grouping, cfg.seed)
    examples = make_examples(builder, dataset.train, dataset.titles)
    G = cfg.groups
    comp = group_composition(examples, token_groups, G, tokenizer)
    rel, grp = torch.cat(token_rel), torch.cat(token_groups)
    mean_rel = [float(rel[grp == g].mean()) if (grp == g).any() else float("nan") for g in range(1, G + 1)]
    sums, counts = group_totals(model, examples, token_groups, G, tokenizer.pad_id, cfg.device, cfg.batch_size)
    L, present = sums / counts.clamp(min=1), counts > 0
    Q = {tau: group_weights(GroupTotals(sums, counts), tau) for tau in own.taus}   # Eq. 5, as training computes it
    effective = dict(zip(own.taus, q_entropy([{"q": Q[t].tolist()} for t in own.taus])))   # exp(H(Q))

    names = [k for k in comp[0] if k not in ("group", "tokens", "top_tokens")]
    print(f"\n{cfg.dataset}: {len(examples)} training windows, {int(present.sum())} of {G} token groups present "
          "(1 = the highest Eq. 3 relevance to the auxiliary tokens)\n")
    print("| group | tokens | mean Eq. 3 relevance | " + " | ".join(names) + " | L(g), base model | "
          + " | ".join(f"Q(g) tau={t:g}" for t in own.taus) + " | most frequent tokens |")
    print("|---" * (len(names) + len(own.taus) + 5) + "|")
    for g, c in enumerate(comp):
        print(f"| {c['group']} | {c['tokens']} | {mean_rel[g]:.2f} | " + " | ".join(f"{c[k]:.0%}" for k in names)
              + f" | {L[g]:.2f} | " + " | ".join(f"{Q[t][g]:.2f}" for t in own.taus) + " | "
              + ", ".join(f"{token_cell(tok)} {share:.0%}" for tok, share in c["top_tokens"]) + " |")
    spread = float(L[present].max() - L[present].min())
    print(f"\nL(g) spread (hardest - easiest group): {spread:.2f} nats. exp(H(Q)) at tau "
          + ", ".join(f"{t:g}: {effective[t]:.2f}" for t in own.taus) + f" (of {int(present.sum())}).")
    if own.json:
        files.write_json(own.json, {
            "dataset": cfg.dataset, "train_file": cfg.train_file, "train_samples": len(examples), "groups": G,
            "seed": cfg.seed, "grouping": cfg.grouping,
            "per_group": [c | {"mean_relevance": mean_rel[g], "base_loss": float(L[g])} for g, c in enumerate(comp)],
            "q": {f"{t:g}": Q[t].tolist() for t in own.taus},
            "exp_H_Q": {f"{t:g}": effective[t] for t in own.taus}, "loss_spread": spread})
        print(f"numbers in {own.json}")
    return {"composition": comp, "mean_relevance": mean_rel, "base_loss": L, "q": Q}


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad input: the message names the file, line or field
        sys.exit(f"error: {e}")
