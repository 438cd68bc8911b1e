"""How many items change item group (Eq. 2, 5 equal-size groups) when Eq. 2 averages over the
title's own tokens instead of over every target token (opening quote, title, closing quote, EOS).

Scores Eq. 3 with the embedded model (the base model; read from the relevance cache when filled)
and prints the count, plus the mean Eq. 3 score of the format tokens.

    python -m tools.eq2_title_tokens --dataset synthetic
    python -m tools.eq2_title_tokens --dataset toy --data-dir ../shared/data/toy
"""

import argparse

import torch

from nanogdrt import grouping, relevance
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.prompt import PromptBuilder
from nanogdrt.tokenizer import Tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="synthetic", help="toy | clothing | book | synthetic")
    parser.add_argument("--data-dir", default=None, help="the dataset folder (default: $NANOGDRT_DATA/<name> or data/<name>)")
    args = parser.parse_args()

    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    model_dir = ensure_embedded_checkpoint()
    model = Llama.from_pretrained(model_dir, dtype=torch.float32, device="cpu").eval()
    builder = PromptBuilder(Tokenizer(model_dir), args.dataset)
    logprobs = relevance.catalogue_logprobs(model, builder, ds)               # Eq. 3, cached
    new = grouping.item_groups(relevance.item_scores(logprobs))               # Eq. 2 over title tokens
    every = {i: torch.ones_like(m) for i, m in logprobs.title_mask.items()}   # the old Eq. 2
    old = grouping.item_groups(relevance.item_scores(logprobs, every))
    moved = sum(new[i] != old[i] for i in new)
    print(f"{args.dataset}: {moved} of {len(new)} items ({100 * moved / len(new):.1f}%) change item group")
    first = torch.stack([lp[0] for lp in logprobs.values()])
    eos = torch.stack([lp[-1] for lp in logprobs.values()])
    fused = sum(bool(m[0]) for m in logprobs.title_mask.values())
    print(f"  first target token: mean Eq. 3 {first.mean():.2f} nats ({fused} items fuse it with the title)")
    print(f"  EOS: mean Eq. 3 {eos.mean():.2f} nats")
    n_format = sum(int((~m).sum()) for m in logprobs.title_mask.values())
    n_all = sum(m.numel() for m in logprobs.title_mask.values())
    print(f"  format tokens (not the title's own): {n_format} of {n_all} target tokens")


if __name__ == "__main__":
    main()
