"""Why is MSL the least fair LLM row? The softmax its decoding scores with (our diagnostic, not the paper's).

    python -m experiments.repro --data-dir ../shared/data/toy --stages diagnose    # the decodes and `mass`
    python -m experiments.repro.normaliser mass --dataset toy --data-dir ../shared/data/toy \
        --rows base,sft-s0,msl-tau1-s0 --users-file docs/repro/test_users.json --out docs/repro/allowed_mass.json

MSL's loss (nanogdrt/baselines/msl.py) is the cross-entropy of a softmax over the trie's allowed
tokens. Where a title's prefix has a single continuation, that softmax gives the token probability
1 whatever the logits are: the loss there is 0 and nothing is learnt at that position. MSL's own
inference (its inference.py: transformers' generate with prefix_allowed_tokens_fn), like every row
of the report, scores a token by the softmax over the whole vocabulary instead. At the untrained
positions a title's score is then whatever the model assigns there: the pre-trained prior, moved
only as a side effect of training the other positions. A prior of that kind is akin to what Eq. 2
measures (how predictable a title's tokens are from the auxiliary tokens alone), so it would
favour item group 1, the titles most relevant to the auxiliary tokens.

The two softmaxes differ by one term. At target position t with allowed set A_t,
log p_vocab(y_t) = log p_allowed(y_t) + log P_vocab(A_t): the allowed-set softmax plus the log of
the mass the full softmax puts on the allowed set. MSL's loss cannot see the second term (a softmax
over A_t is unchanged by any logit outside A_t and by a common shift of those inside), while SFT's
loss pushes it toward 0 on every training title. At a forced position it is the whole score.

The test: the phase `diagnose` of experiments/repro decodes the chosen MSL row and SFT again on
the same test users with `--normaliser allowed` (nanogdrt.scoring.Scoring): every step's softmax over
the allowed tokens, the distribution MSL's loss trains (at tau 1), so a forced token scores log 1 = 0
and only the branching positions rank the titles. Length normalisation interferes: with the
lineage's length_penalty 1 a title's score is a mean over its tokens, and zero-cost forced tokens
then lift long titles (item group 1 has the most forced positions). So each softmax is decoded with
length_penalty 1 and 0 (the plain sum: the title's probability as a chain of the trained softmaxes).
SFT's vocabulary decode with length_penalty 0 is the SFT+D3 row (alpha 0, so the same ranking).
If the untrained term makes MSL unfair, MSL - SFT on DGU@5 shrinks toward 0 under `allowed`; if it
stays, MSL's trained choices at the branching positions carry the unfairness. On Toy it shrinks to
no resolved difference (docs/results.md). The `mass` command measures the term itself on the test
targets (teacher-forced), per item group of the target. A section of the report and the `mass`
stage's command; layer: above rows.py and data.py.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from experiments.repro.data import dataset_of, load_model, prompt_builder, top1_items, top1_summary
from experiments.repro.rows import TABLE_KEYS
from nanogdrt import files
from nanogdrt.infra import run_folder
from nanogdrt.loss import target_logits
from nanogdrt.metrics import N_ITEM_GROUPS
from nanogdrt.stats import effect_word, fmt, paired
from nanogdrt.trie import Trie

# row label -> {(softmax, length_penalty): docs/repro folder}; (vocab, 1) is the report's own row.
DECODES = {"MSL": {("allowed", 1): "msl-allowed", ("vocab", 0): "msl-lp0", ("allowed", 0): "msl-allowed-lp0"},
           "SFT": {("allowed", 1): "sft-allowed", ("vocab", 0): "sft-d3", ("allowed", 0): "sft-allowed-lp0"},
           "GDRT": {("allowed", 1): "gdrt-allowed", ("vocab", 0): "gdrt-lp0", ("allowed", 0): "gdrt-allowed-lp0"}}
CONTRASTS = [("MSL", "SFT"), ("GDRT", "SFT")]   # A - B under each decoding both have
SOFTMAX = {"vocab": "vocabulary", "allowed": "allowed tokens"}


def decode_folders(docs, labels) -> dict[str, dict[tuple[str, int], str]]:
    """DECODES for the rows the report has: label -> {(softmax, lp): folder}, the report's own row as
    (vocab, 1), and only the decodes whose predictions exist."""
    return {label: {("vocab", 1): labels[label], **{k: f for k, f in decodes.items()
                                                   if (Path(docs) / f / "test_predictions.jsonl").exists()}}
            for label, decodes in DECODES.items() if label in labels}


def forced_share(trie, item_group) -> dict[int, float]:
    """item group -> mean share, over its titles, of the target positions (quotes and EOS
    included, as MSL's loss counts them) whose prefix has a single continuation in the trie."""
    n_children = (trie.child_ptr[1:] - trie.child_ptr[:-1]).tolist()
    share = {}
    for leaf, items in trie.leaf_items.items():
        path = trie.prefix_nodes(trie.tokens_of(leaf))   # the node before each target token
        s = float(np.mean([n_children[n] == 1 for n in path]))
        for i in items:
            share[i] = s
    groups = sorted(set(item_group.values()))
    return {g: float(np.mean([share[i] for i, v in item_group.items() if v == g and i in share])) for g in groups}


@torch.no_grad()
def allowed_mass(model, builder, trie, interactions, titles, batch_size=16, progress=False) -> dict:
    """The term MSL's loss cannot see, on each interaction's target title (teacher-forced):
    sum over target positions t of log P_vocab(A_t) = logsumexp of the allowed logits - logsumexp
    of all logits, summed apart over forced positions (|A_t| = 1: there it is the token's whole
    score) and branching ones. Returns {"rows", "forced", "branching", "n_forced", "n_branching"}."""
    device = model.lm_head.weight.device
    trie.to(device)
    out = {"rows": [x.row for x in interactions], "forced": [], "branching": [], "n_forced": [], "n_branching": []}
    examples = [builder.for_interaction(x, titles, with_target=True) for x in interactions]
    for start in tqdm(range(0, len(examples), batch_size), desc="allowed mass", disable=not progress):
        batch = examples[start:start + batch_size]
        ids = torch.full((len(batch), max(len(e.ids) for e in batch)), builder.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for row, e in enumerate(batch):      # right padding: causal attention never sees it
            ids[row, :len(e.ids)] = torch.tensor(e.ids)
            mask[row, e.target[0]:e.target[1]] = True
        ids, mask = ids.to(device), mask.to(device)
        t = target_logits(model.logits, model.hidden_states(ids), ids, mask)
        allowed = trie.allowed(trie.target_nodes(ids, mask))
        inside = t.logits.gather(1, allowed.tokens).masked_fill(~allowed.mask, float("-inf")).logsumexp(-1)
        term = (inside - t.logits.logsumexp(-1)).double()                   # (N,) log P_vocab(A_t)
        forced = allowed.mask.sum(-1) == 1
        for row in range(len(batch)):
            mine = t.rows == row
            out["forced"].append(float(term[mine & forced].sum()))
            out["branching"].append(float(term[mine & ~forced].sum()))
            out["n_forced"].append(int((mine & forced).sum()))
            out["n_branching"].append(int((mine & ~forced).sum()))
    return out


def mass_section(docs, item_group, by_row) -> list[str]:
    """The measured term per target item group (docs/repro/allowed_mass.json, `mass` command), in
    nats per position: under length_penalty 1 a title's score is a mean over its positions."""
    f = Path(docs) / "allowed_mass.json"
    if not f.exists():
        return []
    mass = json.loads(f.read_text())
    groups = range(1, N_ITEM_GROUPS + 1)
    L = ["", f"The term itself, on the test users' target titles ({mass['users']} users, teacher-forced; `python "
         "-m experiments.repro.normaliser mass`): log P_vocab(A_t) in nats per position, pooled over the users whose "
         "target is in each item group, at forced and at branching positions. 0: all of the model's mass is on "
         "catalogue continuations; the more negative, the more a title's vocabulary-softmax score loses to it.", "",
         "| model | positions | " + " | ".join(f"group {g}" for g in groups) + " | all |",
         "|---" * (N_ITEM_GROUPS + 3) + "|"]
    counts = {}
    for folder, m in mass["models"].items():
        g = np.array([item_group.get(by_row[r].target, 0) for r in m["rows"]])
        for kind in ("forced", "branching"):
            v, n = np.array(m[kind]), np.array(m[f"n_{kind}"])
            counts[kind] = [f"{n[g == k].mean():.1f}" if (g == k).any() else "-" for k in groups] + [f"{n.mean():.1f}"]
            L.append(f"| {folder} | {kind} | " + " | ".join(f"{v[g == k].sum() / max(n[g == k].sum(), 1):.2f}"
                                                        if (g == k).any() else "-" for k in groups)
                     + f" | {v.sum() / max(n.sum(), 1):.2f} |")
    for kind, c in counts.items():
        L.append(f"| (positions per title) | {kind} | " + " | ".join(c) + " |")
    return L


def normaliser_section(a, docs, rows, labels, item_group, length, trie) -> list[str]:
    """The report's section: MSL and SFT under each softmax and length normalisation, paired on
    the same users.

    rows: data.Rows; labels: report label -> folder; length: item -> title tokens (Eq. 2's);
    trie: the catalogue's trie (for the share of forced positions per item group)."""
    folders = decode_folders(docs, labels)
    if not any(len(f) > 1 for f in folders.values()):
        return []
    forced = forced_share(trie, item_group)
    groups = range(1, N_ITEM_GROUPS + 1)
    L = ["", "## Why MSL is the least fair LLM row: the decoding's softmax (our diagnostic)", "",
         "MSL's loss is a softmax over the trie's allowed tokens A_t; MSL's own inference (transformers' generate "
         "with the trie), like every row above, scores tokens with the softmax over the whole vocabulary. The two "
         "differ by one term: log p_vocab(y_t) = log p_allowed(y_t) + log P_vocab(A_t), the log of the mass the full "
         "softmax puts on the allowed set. MSL's loss cannot see that term (it is 0 loss at a position with one "
         "continuation, and unchanged by any logit outside A_t elsewhere); SFT's loss pushes it toward 0 on every "
         "training title. Here the MSL row and SFT (and GDRT, to see whether its gain over SFT depends on the "
         "decoding) are decoded again on the same test users with each step's "
         "softmax over the allowed tokens (`--normaliser allowed`: a forced token scores 0), with the lineage's "
         "length normalisation (lp 1: the mean over a title's tokens) and without it (lp 0: the sum). A diagnostic, "
         "not a decoding of any paper; experiments/repro/normaliser.py says what each outcome would mean.", "",
         "Share of target positions with a single continuation (quotes and EOS included, as MSL's loss counts "
         "them), mean over each item group's titles:", "",
         "| item group | " + " | ".join(str(g) for g in groups) + " |", "|---" * (N_ITEM_GROUPS + 1) + "|",
         "| forced positions | " + " | ".join(f"{forced[g]:.0%}" for g in groups) + " |", "",
         "Top-1 columns: each user's first recommendation; 'distinct top-1' counts the different items among "
         "them (a low count: many users get the same few items).", "",
         f"| row | softmax | lp | {' | '.join(TABLE_KEYS)} | top-1 mean title tokens | top-1 in item group 1 "
         f"| top-1 in item group {N_ITEM_GROUPS} | distinct top-1 |", "|---" * (len(TABLE_KEYS) + 7) + "|"]
    for label, decodes in folders.items():
        for (softmax, lp), folder in sorted(decodes.items(), key=lambda kv: (-kv[0][1], kv[0][0] != "vocab")):
            c, t = rows.point(folder), top1_summary(top1_items(docs, folder), item_group, length)
            L.append(f"| {label} ({folder}) | {SOFTMAX[softmax]} | {lp} | "
                     + " | ".join(f"{c[k]:.4f}" for k in TABLE_KEYS)
                     + f" | {t['mean_length']:.1f} | {t['share'][0]:.0%} | {t['share'][-1]:.0%} "
                     f"| {t['distinct']} of {t['n']} |")
    L += ["", f"Paired on the same users ({a.bootstrap} bootstrap resamples); 'A better'/'A worse' when the 95% "
          "interval excludes 0:", "", "| A - B | " + " | ".join(TABLE_KEYS) + " |",
          "|---" * (len(TABLE_KEYS) + 1) + "|"]
    words = {"helps": "A better", "hurts": "A worse"}

    def line(name, A, B):
        d = paired(rows.users(A), rows.users(B), a.bootstrap, 0)
        L.append(f"| {name} | " + " | ".join(f"{fmt(d[k])}: {words.get(effect_word(d[k], k), effect_word(d[k], k))}"
                                            for k in TABLE_KEYS) + " |")
    for label, decodes in folders.items():
        for lp in (1, 0):
            if ("allowed", lp) in decodes and ("vocab", lp) in decodes:
                line(f"{label}, lp {lp}: allowed - vocabulary", decodes[("allowed", lp)], decodes[("vocab", lp)])
    for A, B in CONTRASTS:   # GDRT - SFT: does GDRT's fairness gain survive every decoding?
        if A in folders and B in folders:
            for key in sorted(set(folders[A]) & set(folders[B]), key=lambda k: (-k[1], k[0] != "vocab")):
                line(f"{A} - {B}, {SOFTMAX[key[0]]} softmax, lp {key[1]}", folders[A][key], folders[B][key])
    return L + mass_section(docs, item_group, rows.by_row)


def mass(a):
    """The `mass` command: allowed_mass of each --rows folder's adapter ("base": none) on the
    first --n users of test_users.json, into one JSON file."""
    rows = a.rows.split(",")
    for path in [Path(a.users_file)] + [Path(a.docs) / r / "adapter" for r in rows if r != "base"]:
        if not path.exists():   # before loading data or any model
            raise SystemExit(f"error: {path} does not exist (--users-file / --rows / --docs)")
    try:
        run_folder.check_writable(a.out, "file")
    except files.OutputError as e:
        raise SystemExit(f"error: {e}") from None
    ds = dataset_of(a.dataset, a.data_dir, a.synthetic_size, a.skip_bad)
    users = json.loads(Path(a.users_file).read_text())
    interactions = [ds.test[i] for i in users["index"][:a.n]]
    builder = prompt_builder(a.model, a.dataset)          # the same tokenizer under every adapter
    trie = Trie.from_titles(ds.titles, builder)
    out = {"users": len(interactions), "models": {}}
    for row in rows:
        adapter = None if row == "base" else Path(a.docs) / row / "adapter"
        model = load_model(a.model, adapter, a.device, a.dtype)[1]
        start = time.perf_counter()
        out["models"][row] = allowed_mass(model, builder, trie, interactions, ds.titles, progress=True)
        print(f"{row}: {len(interactions)} users in {time.perf_counter() - start:.0f} s")
    files.write_json(a.out, out)


def main(argv=None):
    p = argparse.ArgumentParser(description="The term MSL's loss cannot see, measured on the test targets.")
    p.add_argument("command", choices=["mass"])
    p.add_argument("--dataset", default="toy")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--synthetic-size", default="full", choices=["full", "small"])
    p.add_argument("--skip-bad", action="store_true", help="as train.py's: malformed rows and blank titles leave")
    p.add_argument("--model", default=None, help="base model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--docs", default="docs/repro", help="the row folders (<row>/adapter)")
    p.add_argument("--rows", required=True, help="comma-separated row folders; base = no adapter")
    p.add_argument("--users-file", required=True, help="test_users.json")
    p.add_argument("--n", type=int, default=None, help="the first n users of the draw")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True)
    try:
        mass(p.parse_args(argv))
    except (FileNotFoundError, ValueError) as e:   # bad input: the message names the file or field
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
