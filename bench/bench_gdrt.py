"""What GDRT costs on top of SFT, measured side by side on the embedded model.

1. Training step: the same LoRA step (forward, backward, AdamW) on the same batches of real
   prompts, with the SFT loss (Eq. 1), the GDRT loss (Eq. 5), MSL's masked softmax and MSL with
   GDRT's group weights (nanogdrt.baselines.methods). Goals: GDRT <= 1.05x SFT; MSL and MSL+GDRT within
   1.15x of SFT (the comparison of the paper's Fig. 12).
2. Grouping: Eq. 3 relevance of every training target token (+ 1-D k-means), against one plain
   no-grad forward pass over the training examples. Goal: grouping <= 1 forward pass.

    python -m bench.bench_gdrt [--dataset synthetic|toy] [--examples 256] [--steps 6]
Run it alone: the machine has 2 cores and any other load skews the numbers.
"""

import argparse
import time

import torch

from nanogdrt import grouping, relevance
from nanogdrt.loss import group_sums_and_counts
from nanogdrt.batches import collate, epoch_batches, make_examples
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.lora import LoRAConfig, inject_lora, lora_parameters
from nanogdrt.baselines.methods import METHODS, TargetLoss, method_loss, target_nodes_of
from nanogdrt.prompt import PromptBuilder
from nanogdrt.trie import Trie
from nanogdrt.tokenizer import Tokenizer


def time_training(model, method, examples, groups, pad_id, steps, trie, nodes, batch_size=8, n_groups=5,
                  tau=0.5, tau_msl=4.5):
    """Seconds per step of train.py's step on one micro-batch (--grad-accum 1): forward, the
    per-token loss and weighting of `method`, backward, the per-group losses it logs, AdamW."""
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    spec = METHODS[method]
    net = TargetLoss(model, spec.per_token, trie, tau_msl)
    batches = epoch_batches(len(examples), batch_size, 0, 0)[:steps + 1]
    elapsed = 0.0
    for i, b in enumerate(batches):
        start = time.perf_counter()
        ids, target_mask, group_ids = collate(examples, groups, b, pad_id, "cpu")
        node_ids = collate(examples, nodes, b, pad_id, "cpu")[2] if spec.per_token == "msl" else None
        out = net(ids, target_mask, node_ids)
        token_group = group_ids[target_mask]
        scope = group_sums_and_counts(out.nll.detach(), token_group, n_groups)   # also the logged L(g)
        loss = method_loss(spec.weighting, out, token_group, None, scope, tau).loss
        loss.backward()
        loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:  # the first step warms up allocators and kernels
            elapsed += time.perf_counter() - start
    return elapsed / (len(batches) - 1)


@torch.no_grad()
def time_forward_pass(model, examples, batch_size, pad_id):
    start = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        T = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), T), pad_id)
        for r, e in enumerate(chunk):
            ids[r, :len(e.ids)] = torch.tensor(e.ids)
        model.hidden_states(ids)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--examples", type=int, default=256, help="training windows")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per method")
    args = p.parse_args()
    path = ensure_embedded_checkpoint()
    tokenizer = Tokenizer(path)
    ds = load_dataset(args.dataset, train_samples=args.examples)
    builder = PromptBuilder(tokenizer, args.dataset if args.dataset != "synthetic" else "synthetic")
    model = Llama.from_pretrained(path)
    examples = make_examples(builder, ds.train, ds.titles)
    n_tokens = sum(e.target[1] - e.target[0] for e in examples)

    # Grouping: relevance of each distinct target title (no cache) + k-means over all target tokens.
    start = time.perf_counter()
    targets = sorted({x.target for x in ds.train})
    logprobs = relevance.item_token_logprobs(model, builder, [ds.titles[i] for i in targets])
    where = {item: k for k, item in enumerate(targets)}
    token_rel = relevance.token_relevance(logprobs, [where[x.target] for x in ds.train])
    groups = grouping.token_groups(token_rel, 5)
    t_group = time.perf_counter() - start
    t_forward = time_forward_pass(model, examples, 8, tokenizer.pad_id)
    print(f"{args.dataset}: {len(examples)} training windows, {n_tokens} target tokens, "
          f"{len(targets)} distinct targets, {torch.get_num_threads()} threads")
    print(f"grouping (Eq. 3 + k-means): {t_group:6.1f} s   one forward pass over the examples: "
          f"{t_forward:6.1f} s   ratio {t_group / t_forward:.2f}")

    trie = Trie.from_titles(ds.titles, builder)
    nodes = target_nodes_of(trie, examples)                 # once per run in train.py, not per step
    inject_lora(model, LoRAConfig())
    model.train()
    seconds = {}
    for method in ("sft", "gdrt", "msl", "msl+gdrt"):
        torch.manual_seed(0)
        seconds[method] = time_training(model, method, examples, groups, tokenizer.pad_id, args.steps, trie, nodes)
    print(f"training step (batch 8): SFT {seconds['sft']:.2f} s   GDRT {seconds['gdrt']:.2f} s   "
          f"ratio {seconds['gdrt'] / seconds['sft']:.3f}")
    for method in ("msl", "msl+gdrt"):
        print(f"training step (batch 8): {method.upper()} {seconds[method]:.2f} s   ratio to SFT "
              f"{seconds[method] / seconds['sft']:.3f} (goal <= 1.15)")


if __name__ == "__main__":
    main()
