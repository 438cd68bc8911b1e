"""Prepare a dataset folder from the raw Amazon 2014 files, as BIGRec and MSL did (GDRT §4.1.1).

    items need a title -> 5-core filter (repeat until every user and item has >= 5 interactions)
    -> each user's items sorted by time -> sliding windows of at most 10 history items + 1 target
    -> all windows sorted by the target's timestamp -> split 8:1:1 into train / valid / test.
    For Books, 100,000 random items are kept before the 5-core filter (seeded here).

The raw files (`reviews_<Category>_5.json.gz`, `meta_<Category>.json.gz`) are downloaded from the
SNAP mirror unless `--raw-dir` already holds them. The windows are cut by nanogdrt.data's
make_windows / split_by_time, the same code that cuts the embedded synthetic dataset; the output is
the folder that nanogdrt.data.load_dataset reads (`train.csv`, `valid.csv`, `test.csv`,
`id2name.json`, and `train_1000.csv`, a seeded sample that `train.py --dataset toy` reads by
default). Every failure is one line naming the file, what was expected and how to get it; a
result with an empty split is an error, and nothing is written then. Titles are kept exactly as the source has them, HTML entities included.

What is dropped is reported, not fatal: items whose metadata has no title or an empty (blank)
title, their reviews, repeated metadata lines (the last title wins), the Books sample and the
5-core filter. The counts are printed and written to `prepare_summary.json` beside the dataset;
titles shared by several kept items are counted too (they are kept: each item keeps its id).

    python -m nanogdrt.infra.prepare toy [--raw-dir DIR] [--out DIR] [--seed N]
"""

import argparse
import ast
import csv
import gzip
import io
import json
import os
import random
import urllib.error
import urllib.request
import zlib
from collections import Counter, defaultdict
from pathlib import Path

from nanogdrt import files
from nanogdrt.infra import run_folder, validate
from nanogdrt.data import CATEGORIES, DataError, is_blank, make_windows, split_by_time

RAW_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
CORE = 5             # 5-core filter
BOOK_ITEMS = 100_000 # §4.1.1: Books is cut to 100k random items before the 5-core filter
SUMMARY_FILE = "prepare_summary.json"  # what was dropped, beside the dataset


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


class PrepareError(ValueError):
    """One line: the file, what was expected, and how to get it."""


def _raw_file(raw_dir, file, given: bool):
    """The raw file in `raw_dir`, downloaded there when absent. A `--raw-dir` that was given must
    exist (it is not created: a typo would otherwise start a multi-GB download into a new folder)."""
    raw_dir = Path(raw_dir)
    path, url = raw_dir / file, RAW_URL + file
    if path.is_file():
        return path
    if given and not raw_dir.is_dir():
        raise PrepareError(f"--raw-dir {raw_dir}: no such folder (expected it to hold {file})")
    raw_dir.mkdir(parents=True, exist_ok=True)
    print(f"{path} not found: downloading {url}")
    try:
        download(url, path)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise PrepareError(f"{path}: not found, and downloading {url} failed ({reason}). Download it by hand "
                           f"into {raw_dir} (or pass --raw-dir DIR, the folder that holds it)") from None
    return path


def _lines(path):
    """The text lines of a .json.gz file; a file that is empty, not gzip or cut short is one error,
    and a line that is not UTF-8 is an error naming that line (not the gzip)."""
    if path.stat().st_size == 0:
        raise PrepareError(f"{path}: empty file (0 bytes): delete it and download {RAW_URL + path.name} again")
    try:
        with gzip.open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:   # e.g. a Latin-1 file: the gzip itself is fine
                    raise DataError(path, line_no, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                                   f"{e.start + 1}); the raw files are UTF-8") from None
                yield line_no, line
    except (OSError, EOFError, zlib.error) as e:
        # BadGzipFile (an OSError): not gzip; EOFError: truncated (an interrupted download)
        raise PrepareError(f"{path}: not a complete gzip file of JSON lines ({type(e).__name__}: {e}); delete "
                           f"it and download {RAW_URL + path.name} again") from None


def read_raw(reviews_path, meta_path, summary=None):
    """Titles by asin (meta lines are Python literals) and (user, asin, time) reviews (strict JSON).

    `summary` (a dict), when given, receives the counts of metadata lines without a usable title."""
    titles, seen = {}, set()
    missing = empty = repeated = 0
    for line_no, line in _lines(meta_path):
        if not line.strip():
            continue
        try:
            meta = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise DataError(meta_path, line_no, f"not a Python dict literal with an 'asin' ({e!r})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("asin"), str):
            raise DataError(meta_path, line_no, f"expected a Python dict literal with a string 'asin', got "
                                                f"{line.strip()[:60]!r}")
        asin, title = meta["asin"], meta.get("title")
        repeated += asin in seen
        seen.add(asin)
        if not isinstance(title, str):                     # items need a title
            missing += 1
        elif is_blank(title):                              # "", blanks, zero-width: nothing to generate
            empty += 1
        else:
            titles[asin] = title
    reviews = []
    for line_no, line in _lines(reviews_path):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            review = (r["reviewerID"], r["asin"], int(r["unixReviewTime"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(reviews_path, line_no, f"bad review line ({e!r})") from None
        if not (isinstance(review[0], str) and isinstance(review[1], str)):   # ids are hashed below
            raise DataError(reviews_path, line_no, f"bad review line: 'reviewerID' and 'asin' must be strings, "
                                                   f"got {review[0]!r}, {review[1]!r}")
        reviews.append(review)
    if not titles:
        raise PrepareError(f"{meta_path}: no item with a title (expected one Python dict per line with "
                           f"'asin' and 'title')")
    if not reviews:
        raise PrepareError(f"{reviews_path}: no reviews (expected one JSON object per line with "
                           f"'reviewerID', 'asin', 'unixReviewTime')")
    if summary is not None:
        summary.update(meta_lines_no_title=missing, meta_lines_empty_title=empty,
                       meta_lines_repeated_asin=repeated, reviews=len(reviews))
    return titles, reviews


def k_core(reviews, k=CORE):
    """Drop users and items with < k interactions, repeatedly, until none is left to drop."""
    while True:
        users = Counter(u for u, _, _ in reviews)
        items = Counter(i for _, i, _ in reviews)
        kept = [r for r in reviews if users[r[0]] >= k and items[r[1]] >= k]
        # dropping a sparse item can push one of its users below k (and back): repeat to a fixed point
        if len(kept) == len(reviews):
            return kept
        reviews = kept


def preprocess(titles, reviews, book_items=None, seed=0, summary=None):
    """§4.1.1 on raw records -> (id2name with new ids 1..N, {split: windows of new ids}).

    `summary` (a dict), when given, receives how many reviews and items each step dropped."""
    summary = summary if summary is not None else {}
    n_reviews = len(reviews)
    untitled = {r[1] for r in reviews if r[1] not in titles}
    reviews = [r for r in reviews if r[1] in titles]  # an item without a title cannot be generated
    summary.update(items_dropped_untitled=len(untitled), reviews_dropped_untitled=n_reviews - len(reviews))
    if book_items is not None:
        items = sorted({i for _, i, _ in reviews})
        if len(items) > book_items:
            # sampled from the sorted asins, so the same seed keeps the same items on any machine
            keep = set(random.Random(seed).sample(items, book_items))
            n = len(reviews)
            reviews = [r for r in reviews if r[1] in keep]
            summary.update(items_dropped_book_sample=len(items) - book_items,
                           reviews_dropped_book_sample=n - len(reviews))
    n, n_items = len(reviews), len({i for _, i, _ in reviews})
    reviews = k_core(reviews)
    asins = sorted({i for _, i, _ in reviews})
    shared = Counter(titles[a] for a in asins)
    summary.update(items_dropped_k_core=n_items - len(asins), reviews_dropped_k_core=n - len(reviews),
                   items_sharing_a_title=sum(c for c in shared.values() if c > 1), items=len(asins),
                   reviews_kept=len(reviews))
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


TRAIN_SAMPLE = 1000  # train_1000.csv: what train.py --dataset toy reads by default, as in the released folder


def _csv_text(windows, id2name) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["user_id", "item_ids", "item_titles", "timestamp"])
    for user, history, target, time in windows:
        items = history + [target]
        writer.writerow([user, str(items), str([id2name[i] for i in items]), time])
    return buffer.getvalue()


def write_dataset(out, id2name, splits, seed=0):
    """The released BIGRec/MSL layout: one CSV per split (item_ids = history then target) +
    id2name.json, each written atomically; plus train_1000.csv, a seeded sample of 1,000 training
    windows in time order (the file train.py's defaults read, like the released Toy folder)."""
    out = Path(out)
    empty = [split for split, windows in splits.items() if not windows]
    if empty:
        raise PrepareError(f"{out}: not written: split(s) {empty} would have no windows after the {CORE}-core "
                           f"filter ({len(id2name)} items left); the raw files are too small or incomplete")
    for split, windows in splits.items():
        files.write_text(out / f"{split}.csv", _csv_text(windows, id2name))
    train = splits["train"]
    keep = sorted(random.Random(f"{seed}:train_{TRAIN_SAMPLE}").sample(range(len(train)), min(TRAIN_SAMPLE, len(train))))
    files.write_text(out / f"train_{TRAIN_SAMPLE}.csv", _csv_text([train[i] for i in keep], id2name))
    files.write_text(out / "id2name.json", json.dumps({str(k): v for k, v in id2name.items()}, indent=4))


def check_out(out):
    """`out` may not hold a dataset already: prepare would overwrite its CSVs and id2name.json
    (the user's, perhaps edited, perhaps from another seed). Checked before the raw files are read."""
    out = Path(out)
    held = sorted(p.name for p in (out.glob("*.csv") if out.is_dir() else []))
    held += ["id2name.json"] * (out / "id2name.json").is_file()
    if held:
        raise PrepareError(f"--out {out}: already holds a dataset ({', '.join(held[:4])}{', ...' * (len(held) > 4)}); "
                           f"choose another --out, or delete those files to rebuild it")


def prepare(name, raw_dir=None, out=None, seed=0):
    """Build data/<name> (or `out`) from the raw 2014 files in `raw_dir` (downloaded if absent);
    `out` may not hold a dataset already (check_out)."""
    category = CATEGORIES[name]
    out = Path(out) if out is not None else Path("data") / name
    check_out(out)
    given = raw_dir is not None
    raw_dir = Path(raw_dir) if given else Path("data") / "raw"
    reviews_path = _raw_file(raw_dir, f"reviews_{category}_5.json.gz", given)
    meta_path = _raw_file(raw_dir, f"meta_{category}.json.gz", given)
    summary = {"dataset": name}
    titles, reviews = read_raw(reviews_path, meta_path, summary)
    id2name, splits = preprocess(titles, reviews, BOOK_ITEMS if name == "book" else None, seed, summary)
    summary["windows"] = {k: len(v) for k, v in splits.items()}
    write_dataset(out, id2name, splits, seed)
    files.write_json(out / SUMMARY_FILE, summary)
    counts = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"wrote {out}: {len(id2name)} items, windows: {counts}")
    print(summary_text(summary) + f" (in {out / SUMMARY_FILE})")
    return out


def summary_text(s):
    """The drop counts of `prepare`'s summary in a few lines."""
    book = "items_dropped_book_sample" in s        # only Books has the random item sample
    items = (f"dropped items: {s['items_dropped_untitled']} without a usable title "
             f"({s['meta_lines_no_title']} metadata lines with no title, {s['meta_lines_empty_title']} "
             f"with an empty one, {s['meta_lines_repeated_asin']} repeating an asin), "
             f"{s['items_dropped_k_core']} by the {CORE}-core filter")
    reviews = (f"dropped reviews: {s['reviews_dropped_untitled']} of untitled items, "
               f"{s['reviews_dropped_k_core']} by the {CORE}-core filter")
    if book:
        items += f", {s['items_dropped_book_sample']} by the Books sample"
        reviews += f", {s['reviews_dropped_book_sample']} by the Books sample"
    kept = (f"kept: {s['items']} items ({s['items_sharing_a_title']} share their title with another), "
            f"{s['reviews_kept']} of {s['reviews']} reviews")
    return "\n".join([items, reviews, kept])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanogdrt.infra.prepare", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(CATEGORIES))
    p.add_argument("--raw-dir", help="folder with (or for) the raw .json.gz files (default data/raw)")
    p.add_argument("--out", help="output folder (default data/<name>)")
    p.add_argument("--seed", type=validate.number(int, min=0), default=0,
                   help="seed of the Books item sample and of train_1000.csv")
    args = p.parse_args(argv)
    try:
        run_folder.check_writable(args.out or Path("data") / args.name, "folder")
        prepare(args.name, args.raw_dir, args.out, args.seed)
    except ValueError as e:   # PrepareError, DataError, OutputError: one line naming the file
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
