"""Prompt lengths in tokens of the embedded tokenizer (mean, 95th percentile, max) for one split.

The generation prompt is what beam search prefills; "with target" adds the quoted title + EOS that
the loss sees in training. Useful to size batches and the KV cache.

    python scripts/prompt_lengths.py --dataset toy --split test --data-dir ../shared/data/toy
"""

import argparse

import numpy as np

from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.prompt import PromptBuilder
from nanogdrt.tokenizer import Tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="toy", help="toy | clothing | book | synthetic")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--data-dir", default=None, help="the dataset folder (default: $NANOGDRT_DATA/<name> or data/<name>)")
    parser.add_argument("--train-file", default=None, help="which train*.csv (default: train.csv, else the largest)")
    args = parser.parse_args()

    ds = load_dataset(args.dataset, data_dir=args.data_dir, train_file=args.train_file)
    builder = PromptBuilder(Tokenizer(ensure_embedded_checkpoint()), args.dataset)
    rows = getattr(ds, args.split)
    prompts = [builder.build([ds.titles[i] for i in x.history], ds.titles[x.target]) for x in rows]
    print(f"{args.dataset} {args.split}: {len(rows)} prompts ({ds.source})")
    for label, lengths in (("prompt", [p.prompt_len for p in prompts]),
                           ("with target", [len(p.ids) for p in prompts])):
        lengths = np.array(lengths)
        print(f"  {label:<12} mean {lengths.mean():6.1f}  p95 {np.percentile(lengths, 95):6.1f}  max {lengths.max()}")


if __name__ == "__main__":
    main()
