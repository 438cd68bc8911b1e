"""Check a dataset folder before a run on it: a report, and exit status 1 when it has an error.

    python -m nanogdrt.infra.check_data DIR [--dataset NAME] [--train-file FILE] [--skip-bad]
                                            [--max-title-tokens N] [--model DIR]

The folder is read as train.py reads it (nanogdrt.data's file choice, header checks and row parser;
the training file train.py picks for the name, e.g. train_1000.csv for toy, unless --train-file),
so "it loads" here means train.py loads it. The checks, each named in the report:

  errors (exit 1): the run would stop, or its numbers would mean nothing
    files           a split file, id2name.json or a CSV header that load_dataset refuses, or a
                    split with no usable row
    prompt          prompt.json missing (a name other than toy/clothing/book) or invalid
    bad-rows        rows load_dataset refuses (not a list of integer ids, no history, unreadable)
    missing-items   rows naming an item id that id2name.json lacks (history or target)
    blank-titles    items whose title is empty or shows nothing (nanogdrt.data.is_blank)
    leakage         the same window in two splits: the same user (user_id column) with the same
                    item_ids (history and target, in order). A model trained on it, or chosen on
                    it, is then evaluated on an example it has seen: the metrics are inflated.
  with --skip-bad, bad-rows, missing-items and blank-titles are warnings: the run drops those rows
  and items (and counts them in results.json), as it then would.

  warnings (exit 0): the run works, but look before trusting it
    leakage         without a user_id column, or across different users: the same item_ids in two
                    splits (two users may share a window, so this alone is no proof of a leak)
    repeated-windows  the same user and item_ids twice within one split (extra weight in training)
    duplicate-titles  one title for several ids: the constrained decoder cannot tell them apart
                    (nanogdrt.metrics counts a hit on any of them, as the paper's code does)
    html-entities   "&amp;", "&#39;" and the like: the model reads them as written (the released
                    data keeps them, so results stay comparable; clean them in your own data)
    time-order      (with a timestamp column in every split) windows of an earlier split later
                    than the earliest window of a later one: the paper cuts train / valid / test at
                    global times (ties at a cut are fine); a leave-one-out split breaks this on purpose
    long-titles     titles over --max-title-tokens tokens: long prompts, slow decoding
    unused-items    catalogue items in no checked split: still candidates of the decoder

  information: the number of rows, and the history-length distribution per split.
"""

import argparse
import ast
import csv
import html
import re
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from nanogdrt.data import (CATEGORIES, DATASET_NAME, PROMPT_FILE, DataError, csv_records, dataset_template,
                           is_blank, load_titles, parse_row, split_file)

ERROR, WARNING = "error", "warning"
SPLITS = ("train", "valid", "test")
# MSL truncates prompts at 512 tokens (cutoff_len). With Toy's template the prompt without titles is
# 79 tokens in SmolLM2's tokenizer, each history item adds its quoted title (+ a comma) and the target
# its quoted title + EOS: 79 + 11 x 38 + 10 = 507, so 10 history titles and a target at 38 tokens fit.
MAX_TITLE_TOKENS = 38
ENTITY = re.compile(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
CHECKS = ("files", "prompt", "bad-rows", "missing-items", "blank-titles", "leakage", "repeated-windows",
          "duplicate-titles", "html-entities", "time-order", "long-titles", "unused-items")


@dataclass
class Finding:
    check: str                  # one of CHECKS
    severity: str               # ERROR or WARNING
    summary: str                # one line
    examples: list[str] = field(default_factory=list)


@dataclass
class Window:
    """One usable row of a split: where it is, whose, its item ids (history then target), its time."""
    file: str
    line: int
    user: str | None
    items: tuple[int, ...]
    time: str | None


@dataclass
class Report:
    folder: Path
    name: str
    files: dict = field(default_factory=dict)        # split -> Path
    titles: dict = field(default_factory=dict)       # item id -> title, as id2name.json has them
    windows: dict = field(default_factory=dict)      # split -> [Window]
    seen: set = field(default_factory=set)           # every item id any row names, refused rows included
    findings: list = field(default_factory=list)
    notes: list = field(default_factory=list)        # what was checked how, or not checked and why
    examples: int = 5

    def add(self, check, severity, summary, examples=()):
        self.findings.append(Finding(check, severity, summary, list(examples)[:self.examples]))

    def count(self, severity):
        return sum(f.severity == severity for f in self.findings)


# ----------------------------------------------------------------------------- reading

def ids_of(row):
    """The integer ids of a row's item_ids, as far as they parse (for rows load_dataset refuses)."""
    try:
        items = ast.literal_eval(row.get("item_ids") or "")
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return []
    return [i for i in items if isinstance(i, int) and not isinstance(i, bool)] if isinstance(items, list) else []


def read_windows(report, path, blank):
    """The split's usable rows as Windows; the rows load_dataset refuses go to `refused`:
    kind ("missing", "blank" or "bad") -> [(line, reason, ids)]."""
    usable = {i: t for i, t in report.titles.items() if i not in blank}
    windows, refused = [], defaultdict(list)
    for line, row in csv_records(path):
        try:
            if isinstance(row, csv.Error):
                raise row
            history, target = parse_row(row, usable, blank)
        except (csv.Error, ValueError) as e:
            ids = ids_of(row) if isinstance(row, dict) else []
            report.seen.update(ids)
            missing = [i for i in ids if i not in report.titles]
            kind = "missing" if missing else "blank" if any(i in blank for i in ids) else "bad"
            refused[kind].append((line, str(e), missing or ids))
        else:
            windows.append(Window(path.name, line, row.get("user_id"), (*history, target), row.get("timestamp")))
            report.seen.update(windows[-1].items)
    return windows, refused


def read_folder(report, train_file, skip_bad):
    """Fill `report` with the folder's files, titles and windows; returns False when nothing more
    can be checked (no catalogue)."""
    folder = report.folder
    try:
        template = dataset_template(report.name, folder)
        source = f"built-in template of {report.name!r}" if report.name in CATEGORIES else PROMPT_FILE
        report.notes.append(f"prompt: {source} (history sentence {template.history!r})")
    except (DataError, OSError) as e:
        report.add("prompt", ERROR, str(e))
    try:
        report.titles = load_titles(folder / "id2name.json")
    except (DataError, OSError) as e:
        report.add("files", ERROR, str(e))
        return False
    blank = {i for i, t in report.titles.items() if is_blank(t)}
    refused = {}
    for split in SPLITS:
        try:
            path = report.files[split] = split_file(folder, split, train_file if split == "train" else None)
            report.windows[split], refused[split] = read_windows(report, path, blank)
        except (DataError, OSError) as e:
            report.add("files", ERROR, str(e))
            continue
        if not report.windows[split]:
            report.add("files", ERROR, f"{path}: no usable data row (load_dataset refuses an empty split)")
    others = sorted(p.name for p in folder.glob("train*.csv") if p != report.files.get("train"))
    if others:
        report.notes.append(f"also present, not checked: {', '.join(others)} (check one with --train-file)")
    report_refused(report, refused, blank, skip_bad)
    return True


def report_refused(report, refused, blank, skip_bad):
    """bad-rows, missing-items, blank-titles: errors, or warnings with --skip-bad (dropped then)."""
    severity = WARNING if skip_bad else ERROR
    fate = "--skip-bad drops them" if skip_bad else "load_dataset refuses the folder (--skip-bad drops them)"
    rows = {kind: [(report.files[s].name, line, why, ids) for s in refused for line, why, ids in refused[s][kind]]
            for kind in ("bad", "missing", "blank")}
    if rows["bad"]:
        report.add("bad-rows", severity, f"{len(rows['bad'])} row(s) that load_dataset cannot read: {fate}",
                   [f"{f}, line {line}: {why}" for f, line, why, _ in rows["bad"]])
    if rows["missing"]:
        ids = sorted({i for *_, missing in rows["missing"] for i in missing})
        per_file = Counter(f for f, *_ in rows["missing"])
        report.add("missing-items", severity,
                   f"{len(rows['missing'])} row(s) ({', '.join(f'{f}: {n}' for f, n in per_file.items())}) name "
                   f"{len(ids)} item id(s) missing from id2name.json ({_listed(ids)}): {fate}",
                   [f"{f}, line {line}: {why}" for f, line, why, _ in rows["missing"]])
    if blank:
        users = Counter(f for f, *_ in rows["blank"])
        used = ", ".join(f"{f}: {n}" for f, n in users.items()) or "none"
        report.add("blank-titles", severity,
                   f"{len(blank)} item(s) with a blank title ({_listed(sorted(blank))}), used by "
                   f"{len(rows['blank'])} row(s) ({used}): no tokens to train on or decode; {fate}",
                   [f"item {i}: {report.titles[i]!r}" for i in sorted(blank)])


def _listed(values, n=10):
    return ", ".join(map(str, values[:n])) + (f", ... ({len(values)} in all)" if len(values) > n else "")


# ----------------------------------------------------------------------------- checks

def has_column(report, attribute):
    """Whether every split's rows carry `attribute` ("user" or "time"): a column of every file."""
    return all(getattr(w, attribute) is not None for windows in report.windows.values() for w in windows)


def check_leakage(report):
    """The same window in two splits (error: same user) or within one (warning)."""
    has_users = has_column(report, "user")
    where = defaultdict(list)             # (user, items) -> [(split, file, line)]
    for split, windows in report.windows.items():
        for w in windows:
            where[(w.user if has_users else None, w.items)].append((split, w.file, w.line))
    shared, repeated = [], []
    for (user, items), places in where.items():
        if len({s for s, *_ in places}) > 1:
            shared.append((user, items, places))
        elif len(places) > 1:
            repeated.append((user, items, places))
    if not has_users:
        report.notes.append("no user_id column in every split: windows are compared by item_ids alone")
    if shared:
        pairs = Counter(" & ".join(sorted({s for s, *_ in places}, key=SPLITS.index)) for *_, places in shared)
        who = "the same user and item_ids" if has_users else "the same item_ids (no user_id column: maybe two users)"
        report.add("leakage", ERROR if has_users else WARNING,
                   f"{len(shared)} window(s) in two splits, {who}: "
                   + ", ".join(f"{k}: {n}" for k, n in pairs.items()), [_where(*s) for s in shared])
    if has_users:
        across = _shared_items_across_users(where)
        if across:
            report.add("leakage", WARNING, f"{len(across)} item_ids sequence(s) in two splits for different users: "
                                           f"no leak of a user's own data, but one input and answer in both",
                       across)
    if repeated:
        same = "same user and item_ids" if has_users else "same item_ids; no user_id column"
        report.add("repeated-windows", WARNING, f"{len(repeated)} window(s) repeated within one split ({same}): "
                                                f"each copy weighs again in training",
                   [_where(*r) for r in repeated])


def _shared_items_across_users(where):
    """item_ids sequences found in two splits under different users: one line each, naming them all."""
    by_items = defaultdict(set)
    for (user, items), places in where.items():
        by_items[items].update((user, s, f, line) for s, f, line in places)
    out = []
    for items, places in by_items.items():
        if len({s for _, s, _, _ in places}) > 1 and len({u for u, *_ in places}) > 1:
            out.append(f"{list(items)}: " + "; ".join(f"user {u}, {f} line {line}" for u, _, f, line in sorted(places)))
    return out


def _where(user, items, places):
    who = f"user {user}, " if user is not None else ""
    return f"{who}item_ids {list(items)}: " + "; ".join(f"{f} line {line}" for _, f, line in places)


def check_titles(report, tokenizer, max_tokens):
    """duplicate-titles, html-entities, long-titles (those need a tokenizer) on the catalogue."""
    titles = {i: t for i, t in report.titles.items() if not is_blank(t)}
    ids_of_title = defaultdict(list)
    for i, t in titles.items():
        ids_of_title[t].append(i)
    shared = {t: ids for t, ids in ids_of_title.items() if len(ids) > 1}
    if shared:
        report.add("duplicate-titles", WARNING,
                   f"{len(shared)} title(s) shared by {sum(map(len, shared.values()))} items: the decoder cannot "
                   f"tell them apart (a hit on any counts)",
                   [f"{t!r}: items {_listed(ids)}" for t, ids in shared.items()])
    entities = {i: [m.group(0) for m in ENTITY.finditer(t) if html.unescape(m.group(0)) != m.group(0)]
                for i, t in titles.items()}
    entities = {i: found for i, found in entities.items() if found}
    if entities:
        counts = Counter(e for found in entities.values() for e in found)
        kinds = ", ".join(f"{e} x{n}" for e, n in counts.most_common(8))
        report.add("html-entities", WARNING, f"{len(entities)} title(s) hold HTML entities ({kinds}): the model "
                                             f"reads them as written", [f"item {i}: {titles[i]!r}" for i in entities])
    if tokenizer is None:
        report.notes.append("long-titles: not checked (no tokenizer)")
        return
    lengths = {i: len(tokenizer.encode(f'"{t}"')) for i, t in titles.items()}   # the quoted title, as decoded
    long = sorted((i for i, n in lengths.items() if n > max_tokens), key=lambda i: -lengths[i])
    report.notes.append(f"title tokens (quoted, as decoded): median {statistics.median(lengths.values()):g}, "
                        f"max {max(lengths.values(), default=0)}; budget {max_tokens}")
    if long:
        report.add("long-titles", WARNING, f"{len(long)} title(s) over {max_tokens} tokens (longest "
                                           f"{lengths[long[0]]}, item {long[0]})",
                   [f"item {i}: {lengths[i]} tokens: {titles[i][:80]!r}" for i in long])


def check_time_order(report):
    """time-order: every window of an earlier split at or before the earliest of each later split."""
    if not report.windows or not has_column(report, "time"):
        report.notes.append("time-order: not checked (no timestamp column in every split)")
        return
    times, bad = {}, []
    for split, windows in report.windows.items():
        times[split] = []
        for w in windows:
            try:
                times[split].append(float(w.time))
            except (TypeError, ValueError):
                bad.append(f"{w.file}, line {w.line}: timestamp {w.time!r}")
    if bad:
        report.add("time-order", WARNING, f"{len(bad)} timestamp(s) that are not numbers: time order not checked", bad)
        return
    splits = [s for s in SPLITS if times.get(s)]
    for i, early in enumerate(splits):
        for late in splits[i + 1:]:
            start = min(times[late])
            n = sum(t > start for t in times[early])
            if n:
                report.add("time-order", WARNING, f"{n} {early} window(s) later than the earliest {late} window "
                                                  f"(timestamp {start:g}); latest {early}: {max(times[early]):g}")


def check_unused(report):
    """unused-items: catalogue ids that no row of the checked files names (refused rows count)."""
    unused = sorted(set(report.titles) - report.seen)
    if unused:
        files = ", ".join(p.name for p in report.files.values())
        report.add("unused-items", WARNING, f"{len(unused)} of {len(report.titles)} catalogue items occur in no "
                                            f"row of {files}: still candidates of the decoder",
                   [f"item {i}: {report.titles[i][:80]!r}" for i in unused])


# ----------------------------------------------------------------------------- the report

def check_folder(folder, name=None, train_file=None, skip_bad=False, tokenizer=None,
                 max_title_tokens=MAX_TITLE_TOKENS, examples=5) -> Report:
    """Every check on `folder` (dataset `name`, default the folder's name), as a Report."""
    folder = Path(folder)
    report = Report(folder, name or folder.resolve().name, examples=examples)
    if read_folder(report, train_file, skip_bad):
        check_leakage(report)
        check_titles(report, tokenizer, max_title_tokens)
        check_time_order(report)
        check_unused(report)
    return report


def history_table(report):
    """Markdown: windows and min / median / max history length per split, then the histogram."""
    lengths = {s: [len(w.items) - 1 for w in ws] for s, ws in report.windows.items() if ws}
    if not lengths:
        return []
    lines = ["| split | file | windows | min | median | max |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {s} | {report.files[s].name} | {len(v)} | {min(v)} | {statistics.median(v):g} | {max(v)} |"
              for s, v in lengths.items()]
    low, high = min(map(min, lengths.values())), max(map(max, lengths.values()))
    width = max(1, -(-(high - low + 1) // 12))    # at most 12 buckets
    lines += ["", "| history length | " + " | ".join(lengths) + " |", "|---" + "|---:" * len(lengths) + "|"]
    for start in range(low, high + 1, width):
        end = min(start + width - 1, high)
        label = str(start) if start == end else f"{start}-{end}"
        counts = [sum(start <= n <= end for n in v) for v in lengths.values()]
        lines.append(f"| {label} | " + " | ".join(map(str, counts)) + " |")
    return lines


def render(report) -> str:
    """The report as Markdown: files, the verdict of every check, the findings, the history lengths."""
    out = [f"# Dataset check: {report.name}", "", f"- folder: {report.folder}"]
    out += [f"- {s}: {p.name}" for s, p in report.files.items()]
    if report.titles:
        out.append(f"- id2name.json: {len(report.titles)} items")
    out += [f"- {note}" for note in report.notes]
    out += ["", "| check | result |", "|---|---|"]
    for check in CHECKS:
        found = [f for f in report.findings if f.check == check]
        out.append(f"| {check} | {', '.join(sorted({f.severity for f in found})) if found else 'ok'} |")
    for severity in (ERROR, WARNING):
        found = [f for f in report.findings if f.severity == severity]
        out += ["", f"## {severity.capitalize()}s ({len(found)})", ""] + ["none"] * (not found)
        for f in found:
            out.append(f"- **{f.check}**: {f.summary}")
            out += [f"  - {e}" for e in f.examples]
    out += ["", "## History lengths (items before the target)", ""] + history_table(report)
    errors, warnings = report.count(ERROR), report.count(WARNING)
    out += ["", f"Result: {errors} error(s), {warnings} warning(s): exit status {int(errors > 0)}."]
    return "\n".join(out) + "\n"


def main(argv=None):
    from nanogdrt.checkpoint import ensure_embedded_checkpoint
    from nanogdrt.infra import validate
    from nanogdrt.infra.config import DATASET_DEFAULTS
    from nanogdrt.tokenizer import Tokenizer

    p = argparse.ArgumentParser(prog="python -m nanogdrt.infra.check_data", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", type=Path, help="the dataset folder (docs/data_format.md)")
    p.add_argument("--dataset", help="its name, as given to train.py (default: the folder's name); decides "
                                     "whether prompt.json is needed (not for toy, clothing, book)")
    p.add_argument("--train-file", help="which train*.csv (default: train.py's for the name, e.g. toy: "
                                        "train_1000.csv, else train.csv, else the largest)")
    p.add_argument("--skip-bad", action="store_true", help="as train.py --skip-bad: bad rows, missing items and "
                                                          "blank titles are dropped, so they are warnings")
    p.add_argument("--max-title-tokens", type=validate.number(int, min=1), default=MAX_TITLE_TOKENS,
                   help="title budget in tokens of the quoted title (38: 10 history titles + a target fit MSL's "
                        "512-token cutoff with Toy's template)")
    p.add_argument("--model", type=Path, help="Hugging Face folder whose tokenizer.json counts title tokens "
                                              "(default: the embedded SmolLM2-135M; no weights are read)")
    p.add_argument("--examples", type=validate.number(int, min=0), default=5, help="examples listed per finding")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        p.error(f"{args.folder}: not a folder")
    name = args.dataset or args.folder.resolve().name
    if not DATASET_NAME.fullmatch(name):
        p.error(f"dataset name {name!r}: expected letters, digits, '_', '-' or '.' (give one with --dataset)")
    tokenizer = Tokenizer(args.model or ensure_embedded_checkpoint())
    train_file = args.train_file or DATASET_DEFAULTS.get(name, {}).get("train_file")   # what train.py reads
    report = check_folder(args.folder, name, train_file, args.skip_bad, tokenizer,
                          args.max_title_tokens, args.examples)
    sys.stdout.write(render(report))
    return 1 if report.count(ERROR) else 0


if __name__ == "__main__":
    sys.exit(main())
