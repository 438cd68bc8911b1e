"""Beam lists of the first N Toy test users and the time they took, as JSON: run it under two
checkouts to check that a change leaves decoding bit-identical and no slower.

    python -m tools.beam_lists --users 10 --out /tmp/new.json                       # this checkout
    PYTHONPATH=/path/to/old/checkout python tools/beam_lists.py --users 10 --out /tmp/old.json
    python -m tools.beam_lists --compare /tmp/old.json /tmp/new.json

Run as a file path (not -m) with PYTHONPATH, `nanogdrt` is imported from the other checkout.
Only `nanogdrt.beam.beam_search`, `Trie.from_titles` and the prompt builder are used, whose
signatures both checkouts share. Each run decodes the users `--repeats` times and keeps every
wall time (alternate the two checkouts, on an idle machine, and compare the medians).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import nanogdrt
from nanogdrt.beam import beam_search
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.prompt import PromptBuilder
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.trie import Trie

TOY_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "toy"


def decode(users: int, repeats: int, data_dir: Path) -> dict:
    ds = load_dataset("toy", data_dir=str(data_dir))
    model_dir = ensure_embedded_checkpoint()
    model = Llama.from_pretrained(model_dir, dtype=torch.float32).eval()
    builder = PromptBuilder(Tokenizer(model_dir), "toy")
    trie = Trie.from_titles(ds.titles, builder)
    prompts = [builder.for_interaction(x, ds.titles, with_target=False).ids for x in ds.test[:users]]
    seconds, results = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        results = beam_search(model, prompts, trie, beams=10, top_k=10, batch_size=32)
        seconds.append(time.perf_counter() - start)
    return {"package": str(Path(nanogdrt.__file__).parent), "users": users, "seconds": seconds,
            "lists": [{"item_ids": r.item_ids, "scores": r.scores} for r in results]}


def compare(old: dict, new: dict) -> str:
    same = old["lists"] == new["lists"]                      # exact: ids and float scores
    t_old, t_new = statistics.median(old["seconds"]), statistics.median(new["seconds"])
    return (f"{old['users']} users: lists {'bit-identical' if same else 'DIFFER'}; median wall time "
            f"{t_old:.2f} s ({old['package']}) vs {t_new:.2f} s ({new['package']}), ratio {t_new / t_old:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=10, help="the first N users of Toy's test split")
    p.add_argument("--repeats", type=int, default=3, help="decodes of the same users (wall time of each kept)")
    p.add_argument("--data-dir", type=Path, default=TOY_DIR, help="the Toy folder")
    p.add_argument("--out", type=Path, help="JSON file to write")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"), help="compare two outputs")
    a = p.parse_args(argv)
    if a.compare:
        print(compare(*(json.loads(f.read_text()) for f in a.compare)))
        return
    if a.out is None:
        p.error("--out is required unless --compare")
    a.out.write_text(json.dumps(decode(a.users, a.repeats, a.data_dir)))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
