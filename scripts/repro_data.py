"""The reproduction's shared facts and its decoding stage, each a small command.

    python scripts/repro_data.py groups --dataset toy --data-dir D --users 1000 --out docs/repro
        -> item_groups.json (Eq. 2 under the base model, no adapter: the groups of MGU/DGU and of
           Fig. 3/8 for every row) and test_users.json (the seeded test users, in draw order)
    python scripts/repro_data.py decode --dataset toy --data-dir D --users-file docs/repro/test_users.json \
        --n 1000 --adapter docs/repro/sft-s0/adapter --out docs/repro/sft-s0/test_predictions.jsonl

Test users. `test_users.json` lists split indices drawn by `random.Random(f"{seed}:test").sample`, the
draw nanogdrt.data uses for `test_samples`, so SASRec's `--test-samples N --seed 0` gets the same
set. "The first n users" of every row are the first n of this draw, so a row decoded on 500
users holds a subset of the 1,000 users of another row; the report pairs rows on common users.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanogdrt import files, grouping, relevance, synthetic
from nanogdrt.baselines import d3  # noqa: E402
from nanogdrt.data import load_dataset  # noqa: E402


def dataset_of(name, data_dir, synthetic_size="full"):
    """The whole dataset (no split is subsampled): rows are looked up by index."""
    return load_dataset(name, data_dir=data_dir, synthetic=synthetic.config_for(name, synthetic_size))


def template_of(name):
    return name if name in ("toy", "book", "clothing") else "synthetic"


def load_model(model, adapter=None, device="cpu", dtype="float32"):
    from nanogdrt.checkpoint import ensure_embedded_checkpoint
    from nanogdrt.llama import Llama
    from nanogdrt.lora import load_adapter
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.tokenizer import Tokenizer

    model_dir = Path(model) if model else ensure_embedded_checkpoint()
    llama = Llama.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    if adapter:
        load_adapter(llama, adapter)
    llama.eval()                                            # no LoRA dropout while decoding
    return model_dir, llama, Tokenizer(model_dir), PromptBuilder


def prompt_builder(model, dataset):
    """The PromptBuilder of `model`'s tokenizer (default: the embedded checkpoint); no weights loaded."""
    from nanogdrt.checkpoint import ensure_embedded_checkpoint
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.tokenizer import Tokenizer
    return PromptBuilder(Tokenizer(Path(model) if model else ensure_embedded_checkpoint()), template_of(dataset))


def draw_test_users(n_split: int, n: int, seed: int) -> list[int]:
    """Split indices of n seeded test users, in draw order (nanogdrt.data._subsample's draw)."""
    return random.Random(f"{seed}:test").sample(range(n_split), min(n, n_split))


def groups(a):
    ds = dataset_of(a.dataset, a.data_dir, a.synthetic_size)
    model_dir, model, tokenizer, PromptBuilder = load_model(a.model, device=a.device, dtype=a.dtype)
    logprobs = relevance.catalogue_logprobs(model, PromptBuilder(tokenizer, template_of(a.dataset)), ds)
    item_group = grouping.item_groups(relevance.item_scores(logprobs))
    out = Path(a.out)
    files.write_json(out / "item_groups.json", {str(k): v for k, v in sorted(item_group.items())})
    index = draw_test_users(len(ds.test), a.users, a.seed)
    files.write_json(out / "test_users.json", {
        "dataset": a.dataset, "seed": a.seed, "split_size": len(ds.test), "model": str(model_dir),
        "draw": f"random.Random('{a.seed}:test').sample(range({len(ds.test)}), {len(index)})",
        "index": index, "rows": [ds.test[i].row for i in index]})


def decode(a):
    from nanogdrt.recommend import recommend
    from nanogdrt.trie import Trie

    ds = dataset_of(a.dataset, a.data_dir, a.synthetic_size)
    users = json.loads(Path(a.users_file).read_text())
    interactions = [ds.test[i] for i in users["index"][:a.n]]
    _, model, tokenizer, PromptBuilder = load_model(a.model, a.adapter, a.device, a.dtype)
    builder = PromptBuilder(tokenizer, template_of(a.dataset))
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
                   help="decode: each step's softmax (nanogdrt.beam.Scoring.normaliser; allowed is a diagnostic)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    groups(a) if a.command == "groups" else decode(a)


if __name__ == "__main__":
    main()
