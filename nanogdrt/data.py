"""Datasets: load the windows (history -> next item) of toy / clothing / book / synthetic / controlled,
or of your own folder.

The paper (GDRT, §4.1.1) follows BIGRec and MSL: each user's items in time order are cut into
sliding windows of at most 10 history items + 1 target, and all windows, sorted by the target's
timestamp, are split 8:1:1 into train / valid / test. make_windows and split_by_time below do that
cut, for nanogdrt.infra.prepare (raw Amazon files -> a dataset folder) and for the generated
sequences (nanogdrt.synthetic, and nanogdrt.controlled's world with its planted shortcut) alike.

A window needs at least MIN_HISTORY = 4 history items: the real Toy files have 5 to 11 item ids per
row, i.e. every user's first four items only ever appear as history. Titles are kept exactly as the
source has them, HTML entities such as "&amp;" included (the released data does the same).

A dataset folder holds `train*.csv`, `valid*.csv`, `test*.csv` and `id2name.json` (item id string
-> title). Each CSV has an `item_ids` column: a Python-literal list, history items first and the
target last (other columns are carried along and ignored). With several `train*.csv` (the Toy folder
has train_1000.csv and train_5000.csv) `train.csv` is used if present, else the largest file in
bytes, unless `train_file` names one (the same rule picks valid and test). Any folder in this
format is a dataset under any name (`load_dataset("shop", data_dir=...)`, train.py --dataset shop
--data-dir DIR): toy, clothing and book have MSL's prompt templates built in, every other name takes
its template from the folder's `prompt.json` (`dataset_template`). The format, file by file:
docs/data_format.md; a checker for leakage, missing items and the like: nanogdrt.infra.check_data.

Bad rows raise DataError naming the file and the CSV line number, 1-based with the header as line 1
(for a quoted record spanning several lines, the line where it ends). With skip_bad=True they are
skipped and counted in RecDataset.skipped instead. A byte that is not UTF-8 makes its own row bad,
and only that row: the files are decoded with surrogateescape, so a bad byte cannot take the
decoder's whole read-ahead buffer (thousands of rows) with it, nor shift the line numbers.

An item whose title is blank (empty, or only whitespace, zero-width and other invisible
characters: `is_blank`) has no tokens to train on, decode or score (Eq. 2 is undefined for it).
The load refuses it up front, naming the item and --skip-bad; with skip_bad=True it leaves the
catalogue (counted under "id2name.json" in RecDataset.skipped) and the rows that use it are
skipped and counted like any bad row. The Books folder ships one: item 5746, title "".
File-level problems are never skippable: a split with no data rows, a missing or repeated column,
an id2name.json key that is not a plain decimal integer or that names an id twice ("7" and "07"
would be the same item), a bad prompt.json. A UTF-8 BOM is dropped.

Build a folder from the raw Amazon 2014 files with `python -m nanogdrt.infra.prepare toy [--raw-dir DIR]`.
"""

import ast
import csv
import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from nanogdrt.controlled import ControlledConfig, generate as generate_world
from nanogdrt.prompt import TEMPLATES, Template
from nanogdrt.synthetic import SyntheticConfig, generate

CATEGORIES = {"toy": "Toys_and_Games", "clothing": "Clothing_Shoes_and_Jewelry", "book": "Books"}
MAX_HISTORY = 10     # sliding window of 11 = 10 history items + the target
MIN_HISTORY = 4      # the released Toy rows have at least 5 item ids
MAX_MESSAGES = 5     # how many skip messages RecDataset.skipped keeps
DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)")   # an id2name.json key: ASCII digits, no leading zero
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")   # a folder dataset's name (part of paths)
PROMPT_FILE = "prompt.json"   # a folder's prompt template (load_template); toy/clothing/book have theirs built in
HISTORY_SLOT = "{history}"    # where prompt.json's "history" sentence takes the quoted titles
PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
# Characters that draw nothing although Unicode calls them letters or symbols (Hangul fillers,
# the braille blank); the categories Z* (spaces), Cc (controls) and Cf (format: zero-width space,
# joiners, word joiner, BOM, soft hyphen) are invisible by category.
INVISIBLE = set("\u115f\u1160\u3164\uffa0\u2800")


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
    template: Template | None = None   # its prompt (PromptBuilder): built-in, or the folder's prompt.json


# ----------------------------------------------------------------------------- windows and splits
# Shared by nanogdrt.infra.prepare (real data) and the synthetic dataset, so both are cut the same way.

def make_windows(sequences):
    """sequences: user -> [(item, time), ...] in time order. Returns [(user, history, target, time)]."""
    windows = []
    for user, seq in sequences.items():
        # every item from the 5th on is a target once; its history is the (at most 10) items before
        # it, so a long sequence gives overlapping windows, as in BIGRec's preprocessing
        for i in range(MIN_HISTORY, len(seq)):
            history = [item for item, _ in seq[max(0, i - MAX_HISTORY):i]]
            windows.append((user, history, seq[i][0], seq[i][1]))
    return windows


def split_by_time(windows):
    """Sort windows by target time (stable: ties keep user order) and cut 8:1:1."""
    # A global time cut, not a per-user leave-one-out: valid and test targets all come after every
    # training target, so the model never trains on the future of the windows it is tested on.
    windows = sorted(windows, key=lambda w: w[3])
    n_train, n_valid = int(0.8 * len(windows)), int(0.1 * len(windows))
    return windows[:n_train], windows[n_train:n_train + n_valid], windows[n_train + n_valid:]


def generated_dataset(name, titles, sequences, source) -> RecDataset:
    """Generated titles and sequences, windowed and split like the real data; row = index in its split."""
    splits = [[Interaction(history, target, row) for row, (_, history, target, _) in enumerate(part)]
              for part in split_by_time(make_windows(sequences))]
    return RecDataset(name, titles, *splits, source=source, skipped={}, template=TEMPLATES[name])


def synthetic_dataset(config: SyntheticConfig = SyntheticConfig()) -> RecDataset:
    """The embedded synthetic dataset (nanogdrt.synthetic)."""
    titles, sequences = generate(config)
    return generated_dataset("synthetic", titles, sequences, f"synthetic(seed={config.seed})")


def controlled_dataset(config: ControlledConfig = ControlledConfig()) -> RecDataset:
    """The controlled world (nanogdrt.controlled); its ground truth: `nanogdrt.controlled.generate(config)`."""
    world = generate_world(config)
    return generated_dataset("controlled", world.titles, world.sequences,
                             f"controlled(seed={config.seed}, shortcut={config.shortcut})")


# ----------------------------------------------------------------------------- loading

def find_dataset_dir(name, data_dir=None):
    """`data_dir` if given, else $NANOGDRT_DATA/<name>, else data/<name> (relative to cwd)."""
    if not DATASET_NAME.fullmatch(name):   # the name becomes part of paths: data/<name>, runs/<name>-<method>
        raise ValueError(f"dataset name {name!r}: expected letters, digits, '_', '-' or '.', "
                         f"starting with a letter or digit")
    if data_dir is not None:
        folder = Path(data_dir)
    elif os.environ.get("NANOGDRT_DATA"):
        folder = Path(os.environ["NANOGDRT_DATA"]) / name
    else:
        folder = Path("data") / name
    if not (folder / "id2name.json").is_file():
        if name in CATEGORIES:
            missing = (f"{folder} has no id2name.json. Build it from the Amazon 2014 files with "
                       f"`python -m nanogdrt.infra.prepare {name}` (downloads, or takes them from --raw-dir), ")
        else:   # a misspelt built-in name lands here too
            missing = (f"it is not built in ({', '.join(CATEGORIES)}, synthetic, controlled), and {folder} has no "
                       f"id2name.json. Your own dataset is a folder of train*.csv, valid*.csv, test*.csv, "
                       f"id2name.json and {PROMPT_FILE} (docs/data_format.md): ")
        raise FileNotFoundError(
            f"dataset {name!r} not found: {missing}point to an existing folder with --data-dir DIR "
            f"(or $NANOGDRT_DATA), or use --dataset synthetic for the embedded offline dataset.")
    return folder


def split_file(folder, split, chosen=None):
    """The CSV file of `split` ("train", "valid" or "test") in `folder`: `chosen` if given, else
    <split>.csv, else the largest <split>*.csv."""
    folder = Path(folder)
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
    # released folders ship subsets such as train_1000.csv beside train_5000.csv: take the fullest
    return max(files, key=lambda p: p.stat().st_size)


def load_template(path) -> Template:
    """prompt.json -> the Template it describes (prompt.py): {"instruction": the task sentence,
    "history": the sentence before the titles, ending in " {history}"}, e.g. Toy's
    {"instruction": "Given a list of toys ...", "history": "The user has played the following toys
    before: {history}"}. {history} stands for the quoted titles and must close the sentence, after
    one space: the prompt's input ends with the titles (MSL's template), and that space opens the
    first item's span. No other {placeholder} is filled, so one is refused rather than sent
    to the model verbatim."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        fields = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, data.count(b"\n", 0, e.start) + 1, f"not UTF-8 text ({e.reason})") from None
    keys = ("instruction", "history")
    if not isinstance(fields, dict) or set(fields) != set(keys):
        got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
        raise DataError(path, None, f"expected a JSON object with exactly the keys {list(keys)} (got {got})")
    for key in keys:
        if not isinstance(fields[key], str) or is_blank(fields[key]):
            raise DataError(path, None, f"{key!r}: expected a non-blank string")
        unknown = sorted(set(PLACEHOLDER.findall(fields[key])) - {HISTORY_SLOT})
        if unknown or (key == "instruction" and HISTORY_SLOT in fields[key]):
            raise DataError(path, None, f"{key!r}: placeholder {(unknown or [HISTORY_SLOT])[0]} is never filled "
                                        f"(the only one is {HISTORY_SLOT}, at the end of 'history')")
    sentence = fields["history"].removesuffix(HISTORY_SLOT)
    if (fields["history"].count(HISTORY_SLOT) != 1 or not fields["history"].endswith(" " + HISTORY_SLOT)
            or is_blank(sentence) or sentence[-2].isspace()):
        raise DataError(path, None, f"'history': expected a sentence, one space, then {HISTORY_SLOT} at the very "
                                    f"end, e.g. \"The user has played the following toys before: {HISTORY_SLOT}\" "
                                    f"(got {fields['history']!r})")
    return Template(fields["instruction"], sentence)


def dataset_template(name, folder) -> Template:
    """The prompt template of the dataset `name` in `folder`. toy, clothing and book use their
    built-in template (MSL's); a prompt.json beside one of them is refused unless it says the
    same, so that a run named "toy" always has MSL's Toy prompt and compares with every other toy
    run (a different prompt for the same files: give the folder another name, --dataset my-toy
    --data-dir DIR). Any other name needs `folder`/prompt.json, checked here, before any row is read."""
    path = Path(folder) / PROMPT_FILE
    if name in CATEGORIES:
        if path.is_file() and load_template(path) != TEMPLATES[name]:
            raise DataError(path, None, f"differs from the built-in template of {name!r} (MSL's), which a "
                                        f"dataset of that name always uses: to use this file, name the "
                                        f"dataset otherwise (--dataset my-{name} --data-dir {folder})")
        return TEMPLATES[name]
    if not path.is_file():
        raise DataError(path, None, f"missing: dataset {name!r} has no built-in prompt template (those are "
                                    f"{', '.join(CATEGORIES)}), so its folder needs a {PROMPT_FILE} "
                                    f"(docs/data_format.md)")
    return load_template(path)


def is_blank(title: str) -> bool:
    """True when `title` shows nothing: str.strip() alone keeps U+200B (zero-width space), U+2060
    (word joiner), U+FEFF and U+00AD, which tokenize to tokens but name no item a user could see."""
    return all(c.isspace() or c in INVISIBLE or unicodedata.category(c) in ("Zs", "Zl", "Zp", "Cc", "Cf")
               for c in title)


def _pairs(pairs):
    """json object hook that keeps every (key, value) pair, so a repeated key is seen, not overwritten."""
    return pairs


def load_titles(path):
    """id2name.json -> {item id: title}. Keys are plain ASCII decimal integers ("7", not "07",
    " 7", "٧" or "+7"), each id once: a key that repeats or means the same id as another is an
    error, as silently keeping the last would change which title an id trains on."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")   # a UTF-8 BOM is dropped
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_pairs)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:  # the line of the bad byte, as for the CSVs
        raise DataError(path, data.count(b"\n", 0, e.start) + 1,
                        f"not UTF-8 text (byte 0x{data[e.start]:02x}: {e.reason})") from None
    if not isinstance(raw, list):
        raise DataError(path, None, "expected a JSON object: item id -> title")
    titles, key_of = {}, {}
    for key, title in raw:  # JSON keys are strings; the CSVs hold integer ids
        if not DECIMAL.fullmatch(key) or not isinstance(title, str):
            raise DataError(path, None, f"entry {key!r}: expected a plain decimal integer id and a string title")
        item = int(key)
        if item in titles:
            raise DataError(path, None, f"keys {key_of[item]!r} and {key!r} both name item {item}")
        titles[item], key_of[item] = title, key
    if not titles:
        raise DataError(path, None, "no items")
    return titles


def drop_blank_titles(titles, path, skip_bad, skipped):
    """The items of `titles` whose title is blank, removed from it (skip_bad) or refused up front,
    before any row is read, naming the item and the remedy. Returns the set of dropped ids."""
    blank = sorted(item for item, title in titles.items() if is_blank(title))
    if blank and not skip_bad:
        items = ", ".join(map(str, blank[:MAX_MESSAGES])) + (", ..." if len(blank) > MAX_MESSAGES else "")
        raise DataError(path, None, f"item{'s' * (len(blank) > 1)} {items}: blank title ({len(blank)} in all): "
                                    f"nothing to train on, decode or score (Eq. 2); --skip-bad / skip_bad=True "
                                    f"drops such items from the catalogue, with the rows that use them")
    for item in blank:
        if len(skipped.setdefault("messages", [])) < MAX_MESSAGES:
            skipped["messages"].append(f"{path}: item {item}: blank title {titles[item]!r}, "
                                       f"dropped from the catalogue")
        del titles[item]
    if blank:
        skipped[Path(path).name] = len(blank)
    if not titles:
        raise DataError(path, None, f"no items ({len(blank)} dropped for a blank title)")
    return set(blank)


def _undecodable(values):
    """The first byte that was not UTF-8 among `values` (strings read with surrogateescape, which
    maps byte b to the lone surrogate U+DC00 + b), as "0xff", or None."""
    for value in values:
        for c in value or "":
            if "\udc80" <= c <= "\udcff":
                return f"0x{ord(c) - 0xDC00:02x}"
    return None


def parse_row(row, titles, dropped=frozenset()):
    """One CSV record -> (history, target); raises ValueError with the reason."""
    if None in row or None in row.values():  # DictReader's marks for too many / too few fields
        raise ValueError("malformed row: wrong number of fields")
    byte = _undecodable(row.values())
    if byte:
        raise ValueError(f"not UTF-8 text (byte {byte})")
    try:
        items = ast.literal_eval(row["item_ids"])  # a Python literal; never eval()
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"item_ids is not a Python literal: {row['item_ids'][:60]!r}") from None
    if not isinstance(items, list):
        raise ValueError(f"item_ids is not a list: {row['item_ids'][:60]!r}")
    for item in items:
        if not isinstance(item, int) or isinstance(item, bool):
            raise ValueError(f"item id {item!r} is not an integer")
        if item in dropped:      # a blank title: no tokens to train on or to decode
            raise ValueError(f"item {item} has no title (blank in id2name.json, dropped from the catalogue)")
        if item not in titles:
            raise ValueError(f"unknown item id {item} (not in id2name.json)")
    if len(items) < 2:
        raise ValueError("empty history: item_ids needs at least one history item and a target")
    return items[:-1], items[-1]


def csv_records(path):
    """The records of one split CSV, after its header checks, as (line, row): `line` is where the
    record ends (1-based, header = 1), `row` a dict of its fields, or the csv.Error that made the
    record unreadable (a broken quote, a NUL byte: a bad row like any other). Header problems
    raise DataError: no row can be read, so they are not skippable."""
    path = Path(path)
    # utf-8-sig: a byte-order mark (as spreadsheet programs write) is dropped, not read as part of
    # the first column's name. surrogateescape: a bad byte becomes a marker in its own row
    # (_undecodable), instead of an exception that loses the decoder's whole buffer of rows.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames
        except csv.Error as e:
            raise DataError(path, 1, f"unreadable header: {e}") from None
        if header and _undecodable(header):
            raise DataError(path, 1, f"unreadable header: not UTF-8 text (byte {_undecodable(header)})")
        if header is None or "item_ids" not in header:
            raise DataError(path, 1, f"missing column 'item_ids' (header: {header})")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:   # DictReader would silently keep the last column of that name
            raise DataError(path, 1, f"repeated column name(s) {repeated}")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:   # the reader moves past the record: the next one still reads
                row = e
            yield reader.line_num, row


def read_split(path, titles, skip_bad=False, skipped=None, dropped=frozenset()):
    """Read one CSV into Interactions; bad rows raise DataError, or are counted when skip_bad.
    `dropped`: items taken out of `titles` for a blank title (their rows are bad rows)."""
    path = Path(path)
    out, n_bad = [], 0
    # bad rows count too: an Interaction's `row` stays the row's index in the file
    for row_index, (line, row) in enumerate(csv_records(path)):
        try:
            if isinstance(row, csv.Error):
                raise row
            history, target = parse_row(row, titles, dropped)
        except (csv.Error, ValueError) as e:
            error = DataError(path, line, str(e))
            if not skip_bad:  # the remedy on the error's first line: a run stops here otherwise
                raise DataError(path, line,
                                f"{e} (--skip-bad / skip_bad=True skips such rows and counts them)") from None
            n_bad += 1  # counted, and a few messages kept, so a run reports what it dropped
            if skipped is not None and len(skipped.setdefault("messages", [])) < MAX_MESSAGES:
                skipped["messages"].append(str(error))
        else:
            out.append(Interaction(history, target, row_index))
    if n_bad and skipped is not None:
        skipped[path.name] = n_bad
    if not out:   # caught here, before any model work, not as an empty tensor at the first step
        raise DataError(path, None, f"no data rows ({n_bad} skipped as bad)" if n_bad else "no data rows")
    return out


def _subsample(rows, n, seed, split):
    """n rows chosen with a seeded RNG, in their original order (all rows if n is None or larger)."""
    if n is None or n >= len(rows):
        return rows
    # One RNG per split (a string seed is hashed the same way on every run), so changing the size of
    # one split does not change which rows another split keeps. Sorting the indices keeps time order.
    keep = sorted(random.Random(f"{seed}:{split}").sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def load_dataset(name, data_dir=None, train_file=None, train_samples=None, valid_samples=None,
                 test_samples=None, seed=0, skip_bad=False, synthetic: SyntheticConfig | None = None,
                 controlled: ControlledConfig | None = None) -> RecDataset:
    """Load a dataset folder, or generate the synthetic one (`synthetic`: its seed and size, default
    the embedded ~2,000 items) or the controlled world (`controlled`: its seed, size and shortcut,
    default the control, shortcut 0), then optionally subsample each split with `seed`."""
    if synthetic is not None and name != "synthetic":
        raise ValueError(f"a SyntheticConfig was given for dataset {name!r}; it applies to 'synthetic' only")
    if controlled is not None and name != "controlled":
        raise ValueError(f"a ControlledConfig was given for dataset {name!r}; it applies to 'controlled' only")
    if name == "synthetic":
        ds = synthetic_dataset(synthetic or SyntheticConfig())
    elif name == "controlled":
        ds = controlled_dataset(controlled or ControlledConfig())
    else:
        folder = find_dataset_dir(name, data_dir)
        template = dataset_template(name, folder)     # before any row is read
        titles, skipped = load_titles(folder / "id2name.json"), {}
        dropped = drop_blank_titles(titles, folder / "id2name.json", skip_bad, skipped)
        splits = {split: read_split(split_file(folder, split, train_file if split == "train" else None),
                                    titles, skip_bad, skipped, dropped) for split in ("train", "valid", "test")}
        ds = RecDataset(name, titles, splits["train"], splits["valid"], splits["test"], str(folder), skipped,
                        template)
    ds.train = _subsample(ds.train, train_samples, seed, "train")
    ds.valid = _subsample(ds.valid, valid_samples, seed, "valid")
    ds.test = _subsample(ds.test, test_samples, seed, "test")
    return ds

