"""Prompt lengths in tokens of the embedded tokenizer (mean, 95th percentile, max) for one split.

The generation prompt is what beam search prefills; "with target" adds the quoted title + EOS that
the loss sees in training. Useful to size batches and the KV cache.

    python -m tools.prompt_lengths --dataset toy --split test --data-dir ../shared/data/toy
    python -m tools.prompt_lengths --dataset toy --split train --train-file train_1000.csv --data-dir ../shared/data/toy
"""

import argparse

import numpy as np

from nanogdrt.batches import epoch_batches, make_examples
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
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size for the padding figure")
    args = parser.parse_args()

    ds = load_dataset(args.dataset, data_dir=args.data_dir, train_file=args.train_file)
    builder = PromptBuilder(Tokenizer(ensure_embedded_checkpoint()), args.dataset)
    rows = getattr(ds, args.split)
    prompts = make_examples(builder, rows, ds.titles)
    print(f"{args.dataset} {args.split}: {len(rows)} prompts ({ds.source})")
    for label, lengths in (("prompt", [p.prompt_len for p in prompts]),
                           ("with target", [len(p.ids) for p in prompts])):
        lengths = np.array(lengths)
        print(f"  {label:<12} mean {lengths.mean():6.1f}  p95 {np.percentile(lengths, 95):6.1f}  max {lengths.max()}")
    # Training pads each batch to its longest row: tokens computed per real token, train.py's
    # batching in plain random order vs grouped by length (its default).
    lengths = [len(p.ids) for p in prompts]
    for label, key in (("random batches", None), ("length-grouped", lengths)):
        batches = epoch_batches(len(lengths), args.batch_size, seed=0, epoch=0, lengths=key)
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        print(f"  {label:<15} batch {args.batch_size}: {padded / sum(lengths):.3f} tokens computed per real token")


if __name__ == "__main__":
    main()
