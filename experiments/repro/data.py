"""The reproduction's shared facts: the dataset, the models, the committed row folders read as
users; and its two data stages, each a small command.

    python -m experiments.repro.data groups --dataset toy --data-dir D --users 1000 --out docs/repro
        -> item_groups.json (Eq. 2 under the base model, no adapter: the groups of MGU/DGU and of
           Fig. 3/8 for every row) and test_users.json (the seeded test users, in draw order)
    python -m experiments.repro.data decode --dataset toy --data-dir D --users-file docs/repro/test_users.json \
        --n 1000 --adapter docs/repro/sft-s0/adapter --out docs/repro/sft-s0/test_predictions.jsonl

Test users. `test_users.json` lists split indices drawn by `random.Random(f"{seed}:test").sample`, the
draw nanogdrt.data uses for `test_samples`, so SASRec's `--test-samples N --seed 0` gets the same
set. "The first n users" of every row are the first n of this draw, so a row decoded on 500
users holds a subset of the 1,000 users of another row; the report pairs rows on common users.
Layer: above rows.py; the sections, figures and report read the rows through `Rows`.
"""

import argparse
import json
import random
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from nanogdrt import files, relevance, synthetic
from nanogdrt.baselines import d3
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.lora import load_adapter
from nanogdrt.metrics import group_distribution
from nanogdrt.prompt import PromptBuilder
from nanogdrt.recommend import recommend
from nanogdrt.relevance import title_token_mask
from nanogdrt.stats import Users, point
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.trie import Trie


def dataset_of(name, data_dir, synthetic_size="full", skip_bad=False):
    """The whole dataset (no split is subsampled): rows are looked up by index. skip_bad: as train.py's
    --skip-bad (Books: the empty title of item 5746 leaves the catalogue, its windows are dropped)."""
    return load_dataset(name, data_dir=data_dir, synthetic=synthetic.config_for(name, synthetic_size),
                        skip_bad=skip_bad)


class Loaded(NamedTuple):
    model_dir: Path
    model: Llama
    tokenizer: Tokenizer


def load_model(model, adapter=None, device="cpu", dtype="float32") -> Loaded:
    """The base model (default: the embedded checkpoint), with a LoRA adapter folder if given, in eval mode."""
    model_dir = Path(model) if model else ensure_embedded_checkpoint()
    llama = Llama.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    if adapter:
        load_adapter(llama, adapter)
    llama.eval()                                            # no LoRA dropout while decoding
    return Loaded(model_dir, llama, Tokenizer(model_dir))


def prompt_builder(model, dataset):
    """The PromptBuilder of `model`'s tokenizer (default: the embedded checkpoint); no weights loaded."""
    return PromptBuilder(Tokenizer(Path(model) if model else ensure_embedded_checkpoint()), dataset)


def read_item_groups(docs) -> dict[int, int]:
    """docs/repro/item_groups.json: item id -> item group (Eq. 2, under the base model)."""
    return {int(k): v for k, v in json.loads((Path(docs) / "item_groups.json").read_text()).items()}


class Rows:
    """The committed row folders of docs/repro as Users, each read and scored once: the report's
    sections and the figures ask for the same rows (sft-s0 above all) several times."""

    def __init__(self, docs, test, titles, item_group):
        self.docs, self.by_row, self.titles, self.item_group = Path(docs), {x.row: x for x in test}, titles, item_group
        self._users = {}

    def users(self, folder) -> Users:
        """docs/repro/<folder>/test_predictions.jsonl as Users."""
        if folder not in self._users:
            lines = (self.docs / folder / "test_predictions.jsonl").read_text().splitlines()
            self._users[folder] = Users([json.loads(x) for x in lines], self.by_row, self.titles, self.item_group)
        return self._users[folder]

    def has(self, folder) -> bool:
        """Whether the row has been decoded on the test users."""
        return (self.docs / folder / "test_predictions.jsonl").exists()

    def point(self, folder) -> dict:
        """The row's metrics on all of its users."""
        return point(self.users(folder))


def top1_items(docs, folder) -> list[int]:
    """The first recommendation of each user in docs/repro/<folder>/test_predictions.jsonl (users
    with an empty list skipped)."""
    lines = (Path(docs) / folder / "test_predictions.jsonl").read_text().splitlines()
    return [r["topk_item_ids"][0] for r in map(json.loads, lines) if r["topk_item_ids"]]


def title_lengths(builder, titles, item_group) -> dict[int, int]:
    """item -> its title's tokens without quotes and EOS: the tokens Eq. 2 averages."""
    return {i: int(title_token_mask(builder, titles[i]).sum()) for i in item_group}


def top1_summary(items, item_group, length) -> dict:
    """Users' top-1 items (those with an item group): their mean title length (`length`: title_lengths),
    the share in each item group, how many different items and how many in all."""
    items = [i for i in items if i in item_group]
    return {"mean_length": float(np.mean([length[i] for i in items])),
            "share": group_distribution(items, item_group), "distinct": len(set(items)), "n": len(items)}


def draw_test_users(n_split: int, n: int, seed: int) -> list[int]:
    """Split indices of n seeded test users, in draw order (nanogdrt.data._subsample's draw)."""
    return random.Random(f"{seed}:test").sample(range(n_split), min(n, n_split))


def groups(a):
    ds = dataset_of(a.dataset, a.data_dir, a.synthetic_size, a.skip_bad)
    model_dir, model, tokenizer = load_model(a.model, device=a.device, dtype=a.dtype)
    item_group = relevance.dataset_item_groups(model, PromptBuilder(tokenizer, a.dataset), ds)
    out = Path(a.out)
    files.write_json(out / "item_groups.json", {str(k): v for k, v in sorted(item_group.items())})
    index = draw_test_users(len(ds.test), a.users, a.seed)
    files.write_json(out / "test_users.json", {
        "dataset": a.dataset, "seed": a.seed, "split_size": len(ds.test), "model": str(model_dir),
        "draw": f"random.Random('{a.seed}:test').sample(range({len(ds.test)}), {len(index)})",
        "index": index, "rows": [ds.test[i].row for i in index]})


def decode(a):
    ds = dataset_of(a.dataset, a.data_dir, a.synthetic_size, a.skip_bad)
    users = json.loads(Path(a.users_file).read_text())
    interactions = [ds.test[i] for i in users["index"][:a.n]]
    _, model, tokenizer = load_model(a.model, a.adapter, a.device, a.dtype)
    builder = PromptBuilder(tokenizer, a.dataset)
    start = time.perf_counter()
    decoding = d3.decoding("cbs", normaliser=a.normaliser, length_penalty=a.length_penalty, beams=a.beams,
                           batch_size=a.batch_size)
    records = recommend(model, builder, Trie.from_titles(ds.titles, builder), interactions, ds.titles, decoding,
                        progress=True)
    seconds = time.perf_counter() - start
    for r in records:
        r.pop("prompt_ids")                                 # rebuilt from the row when needed
    files.write_jsonl(a.out, records)
    print(f"{len(records)} users in {seconds:.0f} s ({seconds / max(len(records), 1):.2f} s/user) -> {a.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["groups", "decode"])
    p.add_argument("--dataset", default="toy")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--synthetic-size", default="full", choices=["full", "small"])
    p.add_argument("--skip-bad", action="store_true", help="as train.py's: malformed rows and blank titles leave")
    p.add_argument("--model", default=None, help="base model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (decode; default: the base model)")
    p.add_argument("--users", type=int, default=1000, help="groups: test users drawn")
    p.add_argument("--users-file", default=None, help="decode: test_users.json")
    p.add_argument("--n", type=int, default=None, help="decode: the first n users of the draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="decode: score = sum log p / len^lp (1: the lineage's; 0: the plain sum)")
    p.add_argument("--normaliser", default="vocab", choices=list(d3.NORMALISERS),
                   help="decode: each step's softmax (nanogdrt.scoring.Scoring.normaliser; allowed is a diagnostic)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    groups(a) if a.command == "groups" else decode(a)


if __name__ == "__main__":
    main()
