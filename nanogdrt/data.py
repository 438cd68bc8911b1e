"""Datasets: load the windows (history -> next item) of toy / clothing / book / synthetic, or build them.

The paper (GDRT, §4.1.1) uses three Amazon 2014 categories, preprocessed as in BIGRec and MSL:

    items need a title -> 5-core filter (repeat until every user and item has >= 5 interactions)
    -> each user's items sorted by time -> sliding windows of at most 10 history items + 1 target
    -> all windows sorted by the target's timestamp -> split 8:1:1 into train / valid / test.
    For Books, 100,000 random items are kept before the 5-core filter (seeded here).

A window needs at least MIN_HISTORY = 4 history items: the real Toy files have 5 to 11 item ids per
row, i.e. every user's first four items only ever appear as history. Titles are kept exactly as the
source has them, HTML entities such as "&amp;" included (the released data does the same).

A dataset folder holds `train*.csv`, `valid*.csv`, `test*.csv` and `id2name.json` (item id string
-> title). Each CSV has an `item_ids` column: a Python-literal list, history items first and the
target last (other columns are carried along and ignored). With several `train*.csv` (the Toy folder
has train_1000.csv and train_5000.csv) `train.csv` is used if present, else the largest file in
bytes, unless `train_file` names one (the same rule picks valid and test).

Bad rows raise DataError naming the file and the CSV line number, 1-based with the header as line 1
(for a quoted record spanning several lines, the line where it ends). With skip_bad=True they are
skipped and counted in RecDataset.skipped instead.

    python -m nanogdrt.data prepare toy [--raw-dir DIR] [--out DIR]
"""

import argparse
import ast
import csv
import gzip
import json
import os
import random
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

CATEGORIES = {"toy": "Toys_and_Games", "clothing": "Clothing_Shoes_and_Jewelry", "book": "Books"}
RAW_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
MAX_HISTORY = 10     # sliding window of 11 = 10 history items + the target
MIN_HISTORY = 4      # the released Toy rows have at least 5 item ids
CORE = 5             # 5-core filter
BOOK_ITEMS = 100_000 # §4.1.1: Books is cut to 100k random items before the 5-core filter
MAX_MESSAGES = 5     # how many skip messages RecDataset.skipped keeps


class DataError(ValueError):
    """A problem in a data file, with the file and (1-based, header = 1) line number."""

    def __init__(self, file, line, message):
        self.file, self.line = str(file), line
        super().__init__(f"{file}, line {line}: {message}" if line else f"{file}: {message}")


@dataclass
class Interaction:
    history: list[int]  # item ids, oldest first
    target: int         # the next item
    row: int            # 0-based data row index in its CSV file (or in the synthetic split)


@dataclass
class RecDataset:
    name: str
    titles: dict[int, str]
    train: list[Interaction]
    valid: list[Interaction]
    test: list[Interaction]
    source: str
    # file name -> number of skipped rows, plus "messages": the first few reasons (skip_bad=True)
    skipped: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- windows and splits
# Shared by `prepare` (real data) and nanogdrt.synthetic, so both are cut the same way.

def make_windows(sequences):
    """sequences: user -> [(item, time), ...] in time order. Returns [(user, history, target, time)]."""
    windows = []
    for user, seq in sequences.items():
        for i in range(MIN_HISTORY, len(seq)):
            history = [item for item, _ in seq[max(0, i - MAX_HISTORY):i]]
            windows.append((user, history, seq[i][0], seq[i][1]))
    return windows


def split_by_time(windows):
    """Sort windows by target time (stable: ties keep user order) and cut 8:1:1."""
    windows = sorted(windows, key=lambda w: w[3])
    n_train, n_valid = int(0.8 * len(windows)), int(0.1 * len(windows))
    return windows[:n_train], windows[n_train:n_train + n_valid], windows[n_train + n_valid:]


# ----------------------------------------------------------------------------- loading

def find_dataset_dir(name, data_dir=None):
    """`data_dir` if given, else $NANOGDRT_DATA/<name>, else data/<name> (relative to cwd)."""
    if data_dir is not None:
        folder = Path(data_dir)
    elif os.environ.get("NANOGDRT_DATA"):
        folder = Path(os.environ["NANOGDRT_DATA"]) / name
    else:
        folder = Path("data") / name
    if not (folder / "id2name.json").is_file():
        raise FileNotFoundError(
            f"dataset {name!r} not found: {folder} has no id2name.json. Build it from the Amazon 2014 "
            f"files with `python -m nanogdrt.data prepare {name}` (downloads, or takes them from --raw-dir), "
            f"point to an existing folder with --data-dir DIR (or $NANOGDRT_DATA), "
            f"or use --dataset synthetic for the embedded offline dataset.")
    return folder


def _pick_file(folder, split, chosen=None):
    if chosen is not None:
        path = folder / chosen
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such {split} file")
        return path
    if (folder / f"{split}.csv").is_file():
        return folder / f"{split}.csv"
    files = sorted(folder.glob(f"{split}*.csv"))
    if not files:
        raise FileNotFoundError(f"{folder}: no {split}*.csv file")
    return max(files, key=lambda p: p.stat().st_size)


def load_titles(path):
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise DataError(path, None, "expected a JSON object: item id -> title")
    titles = {}
    for key, title in raw.items():
        if not key.lstrip("-").isdigit() or not isinstance(title, str):
            raise DataError(path, None, f"entry {key!r}: expected an integer id and a string title")
        titles[int(key)] = title
    return titles


def _parse_row(row, titles):
    """One CSV record -> (history, target); raises ValueError with the reason."""
    if None in row or None in row.values():  # DictReader's marks for too many / too few fields
        raise ValueError("malformed row: wrong number of fields")
    try:
        items = ast.literal_eval(row["item_ids"])  # a Python literal; never eval()
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"item_ids is not a Python literal: {row['item_ids'][:60]!r}") from None
    if not isinstance(items, list):
        raise ValueError(f"item_ids is not a list: {row['item_ids'][:60]!r}")
    for item in items:
        if not isinstance(item, int) or isinstance(item, bool):
            raise ValueError(f"item id {item!r} is not an integer")
        if item not in titles:
            raise ValueError(f"unknown item id {item} (not in id2name.json)")
        if not titles[item].strip():
            raise ValueError(f"item {item} has no title")
    if len(items) < 2:
        raise ValueError("empty history: item_ids needs at least one history item and a target")
    return items[:-1], items[-1]


def read_split(path, titles, skip_bad=False, skipped=None):
    """Read one CSV into Interactions; bad rows raise DataError, or are counted when skip_bad."""
    path = Path(path)
    out, n_bad = [], 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames
        except csv.Error as e:
            raise DataError(path, 1, f"unreadable header: {e}") from None
        if header is None or "item_ids" not in header:
            # a file-level problem: no row can be read, so it is not skippable
            raise DataError(path, 1, f"missing column 'item_ids' (header: {header})")
        row_index = 0
        while True:
            try:
                row = next(reader)
                history, target = _parse_row(row, titles)
            except StopIteration:
                break
            except (csv.Error, ValueError) as e:
                error = DataError(path, reader.line_num, str(e))
                if not skip_bad:
                    raise error from None
                n_bad += 1
                if skipped is not None and len(skipped.setdefault("messages", [])) < MAX_MESSAGES:
                    skipped["messages"].append(str(error))
            else:
                out.append(Interaction(history, target, row_index))
            row_index += 1
    if n_bad and skipped is not None:
        skipped[path.name] = n_bad
    return out


def _subsample(rows, n, seed, split):
    """n rows chosen with a seeded RNG, in their original order (all rows if n is None or larger)."""
    if n is None or n >= len(rows):
        return rows
    keep = sorted(random.Random(f"{seed}:{split}").sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def load_dataset(name, data_dir=None, train_file=None, train_samples=None, valid_samples=None,
                 test_samples=None, seed=0, skip_bad=False) -> RecDataset:
    """Load a dataset folder (or the embedded synthetic one), optionally subsampled with `seed`."""
    if name == "synthetic":
        from nanogdrt.synthetic import synthetic_dataset  # lazy: synthetic imports this module
        ds = synthetic_dataset()
    else:
        if name not in CATEGORIES:
            raise ValueError(f"unknown dataset {name!r} (known: {sorted(CATEGORIES)} and 'synthetic')")
        folder = find_dataset_dir(name, data_dir)
        titles = load_titles(folder / "id2name.json")
        skipped = {}
        splits = {split: read_split(_pick_file(folder, split, train_file if split == "train" else None),
                                    titles, skip_bad, skipped) for split in ("train", "valid", "test")}
        ds = RecDataset(name, titles, splits["train"], splits["valid"], splits["test"], str(folder), skipped)
    ds.train = _subsample(ds.train, train_samples, seed, "train")
    ds.valid = _subsample(ds.valid, valid_samples, seed, "valid")
    ds.test = _subsample(ds.test, test_samples, seed, "test")
    return ds


# ----------------------------------------------------------------------------- prepare from raw files

def download(url, dest):
    """Fetch `url` to `dest` with a progress bar; resumes a `.part` file (HTTP Range), then renames."""
    from tqdm import tqdm

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at the end: the .part is already complete
            os.replace(part, dest)
            return dest
        raise
    with response:
        if have and response.status != 206:  # the server ignored the Range header: start over
            have = 0
        size = response.headers.get("Content-Length")
        total = have + int(size) if size is not None else None
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(part, dest)  # atomic: `dest` exists only once complete
    return dest


def _raw_file(raw_dir, file):
    path = Path(raw_dir) / file
    if not path.is_file():
        Path(raw_dir).mkdir(parents=True, exist_ok=True)
        print(f"{path} not found: downloading {RAW_URL + file}")
        download(RAW_URL + file, path)
    return path


def read_raw(reviews_path, meta_path):
    """Titles by asin (meta lines are Python literals) and (user, asin, time) reviews (strict JSON)."""
    titles = {}
    with gzip.open(meta_path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                meta = ast.literal_eval(line)
            except (ValueError, SyntaxError) as e:
                raise DataError(meta_path, line_no, f"not a Python literal ({e})") from None
            title = meta.get("title")
            if isinstance(title, str) and title.strip():  # items need a title
                titles[meta["asin"]] = title
    reviews = []
    with gzip.open(reviews_path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                reviews.append((r["reviewerID"], r["asin"], int(r["unixReviewTime"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(reviews_path, line_no, f"bad review line ({e!r})") from None
    return titles, reviews


def k_core(reviews, k=CORE):
    """Drop users and items with < k interactions, repeatedly, until none is left to drop."""
    while True:
        users = Counter(u for u, _, _ in reviews)
        items = Counter(i for _, i, _ in reviews)
        kept = [r for r in reviews if users[r[0]] >= k and items[r[1]] >= k]
        if len(kept) == len(reviews):
            return kept
        reviews = kept


def preprocess(titles, reviews, book_items=None, seed=0):
    """§4.1.1 on raw records -> (id2name with new ids 1..N, {split: windows of new ids})."""
    reviews = [r for r in reviews if r[1] in titles]
    if book_items is not None:
        items = sorted({i for _, i, _ in reviews})
        if len(items) > book_items:
            keep = set(random.Random(seed).sample(items, book_items))
            reviews = [r for r in reviews if r[1] in keep]
    reviews = k_core(reviews)
    asins = sorted({i for _, i, _ in reviews})
    new_id = {asin: n for n, asin in enumerate(asins, 1)}  # consecutive ids from 1, in asin order
    user_id = {}
    sequences = defaultdict(list)
    for user, asin, time in reviews:  # dict order = first appearance in the review file
        user_id.setdefault(user, len(user_id))
        sequences[user_id[user]].append((new_id[asin], time))
    for seq in sequences.values():
        seq.sort(key=lambda x: x[1])  # stable: same-day reviews keep the file's order
    train, valid, test = split_by_time(make_windows(sequences))
    id2name = {new_id[a]: titles[a] for a in asins}
    return id2name, {"train": train, "valid": valid, "test": test}


def write_dataset(out, id2name, splits):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, windows in splits.items():
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["user_id", "item_ids", "item_titles", "timestamp"])
            for user, history, target, time in windows:
                items = history + [target]
                writer.writerow([user, str(items), str([id2name[i] for i in items]), time])
    (out / "id2name.json").write_text(json.dumps({str(k): v for k, v in id2name.items()}, indent=4),
                                      encoding="utf-8")


def prepare(name, raw_dir=None, out=None, seed=0):
    """Build data/<name> (or `out`) from the raw 2014 files in `raw_dir` (downloaded if absent)."""
    category = CATEGORIES[name]
    raw_dir = Path(raw_dir) if raw_dir is not None else Path("data") / "raw"
    reviews_path = _raw_file(raw_dir, f"reviews_{category}_5.json.gz")
    meta_path = _raw_file(raw_dir, f"meta_{category}.json.gz")
    titles, reviews = read_raw(reviews_path, meta_path)
    id2name, splits = preprocess(titles, reviews, BOOK_ITEMS if name == "book" else None, seed)
    out = Path(out) if out is not None else Path("data") / name
    write_dataset(out, id2name, splits)
    counts = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"wrote {out}: {len(id2name)} items, windows: {counts}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanogdrt.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build a dataset folder from the Amazon 2014 raw files")
    p.add_argument("name", choices=sorted(CATEGORIES))
    p.add_argument("--raw-dir", help="folder with (or for) the raw .json.gz files (default data/raw)")
    p.add_argument("--out", help="output folder (default data/<name>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Books item sample")
    args = parser.parse_args(argv)
    prepare(args.name, args.raw_dir, args.out, args.seed)


if __name__ == "__main__":
    main()
