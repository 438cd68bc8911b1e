"""nanogdrt.infra.check_data: each check on a small clean folder with exactly one planted problem
(and nothing else found), the exit status of the command and the text of its report."""

import json

import pytest

from nanogdrt.data import load_dataset
from nanogdrt.infra import check_data
from nanogdrt.infra.check_data import ERROR, WARNING, check_folder, render

TITLES = {1: "Uno", 2: "Jenga", 3: "Chess", 4: "Go", 5: "Risk", 6: "Clue"}
PROMPT = {"instruction": "Given a list of games the user has played before, please recommend a new game.",
          "history": "The user has played the following games before: {history}"}
# user, item_ids, timestamp: every item used, times in order (train <= valid <= test), no repeats
CLEAN = {"train.csv": [(1, [1, 2, 3], 10), (2, [2, 3, 4, 5], 11), (3, [6, 1], 12)],
         "valid.csv": [(1, [1, 2, 3, 4], 20), (2, [2, 3], 21)],
         "test.csv": [(2, [2, 3, 4, 5, 6], 30), (3, [1, 6], 31)]}


def write(folder, splits=CLEAN, titles=TITLES, prompt=PROMPT):
    """A dataset folder in the documented format (docs/data_format.md)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "id2name.json").write_text(json.dumps({str(k): v for k, v in titles.items()}))
    if prompt is not None:
        (folder / "prompt.json").write_text(json.dumps(prompt))
    for name, rows in splits.items():
        lines = [f'{user},"{items}",{time}' if isinstance(items, list) else f"{user},{items},{time}"
                 for user, items, time in rows]
        (folder / name).write_text("user_id,item_ids,timestamp\n" + "".join(line + "\n" for line in lines))
    return folder


def found(report):
    return {(f.check, f.severity) for f in report.findings}


def with_rows(split, *rows):
    return {**CLEAN, split: CLEAN[split] + list(rows)}


def test_clean_folder_has_no_finding(tmp_path, tokenizer):
    report = check_folder(write(tmp_path / "shop"), tokenizer=tokenizer)
    assert report.name == "shop" and report.findings == []
    text = render(report)
    assert "| leakage | ok |" in text and "Result: 0 error(s), 0 warning(s): exit status 0." in text
    # history lengths (len(item_ids) - 1): train 2, 3, 1; valid 3, 1; test 4, 1
    assert "| train | train.csv | 3 | 1 | 2 | 3 |" in text and "| test | test.csv | 2 | 1 | 2.5 | 4 |" in text
    assert "| 1 | 1 | 1 | 1 |" in text and "| 3 | 1 | 1 | 0 |" in text and "| 4 | 0 | 0 | 1 |" in text


STOPS_THE_RUN = ("files", "prompt", "bad-rows", "missing-items", "blank-titles")
PLANTED = {   # name: (splits, titles, check, severity); each changes CLEAN in one way only
    "same user and window in train and test": (with_rows("test.csv", (3, [6, 1], 31)), TITLES, "leakage", ERROR),
    "same window, different users": (with_rows("test.csv", (9, [6, 1], 31)), TITLES, "leakage", WARNING),
    "a window twice in train": (with_rows("train.csv", (3, [6, 1], 12)), TITLES, "repeated-windows", WARNING),
    "test target not in the catalogue": (with_rows("test.csv", (1, [1, 2, 9], 31)), TITLES, "missing-items", ERROR),
    "valid history item not in the catalogue": (with_rows("valid.csv", (2, [7, 2], 21)), TITLES,
                                                "missing-items", ERROR),
    "a row that is no list of ids": (with_rows("train.csv", (4, '"[1, \'x\']"', 12)), TITLES, "bad-rows", ERROR),
    "zero-width and ideographic blank title": (CLEAN, {**TITLES, 4: "\u200b\u3000"}, "blank-titles", ERROR),
    "one title for two ids": (CLEAN, {**TITLES, 6: "Uno"}, "duplicate-titles", WARNING),
    "an HTML entity": (CLEAN, {**TITLES, 5: "Risk &amp; Co"}, "html-entities", WARNING),
    "a train window after valid's first": (with_rows("train.csv", (4, [3, 4], 25)), TITLES, "time-order", WARNING),
    "a title over the token budget": (CLEAN, {**TITLES, 4: "Go " * 60}, "long-titles", WARNING),
    "an item in no row": (CLEAN, {**TITLES, 7: "Monopoly"}, "unused-items", WARNING),
}


@pytest.mark.parametrize("case", PLANTED)
def test_each_check_finds_its_planted_problem_and_nothing_else(tmp_path, tokenizer, case):
    splits, titles, check, severity = PLANTED[case]
    report = check_folder(write(tmp_path / "shop", splits, titles), tokenizer=tokenizer)
    assert found(report) == {(check, severity)}
    assert f"- **{check}**:" in render(report)
    if check in STOPS_THE_RUN:   # the checker's errors are load_dataset's refusals (and leakage)
        with pytest.raises(ValueError):
            load_dataset("shop", data_dir=tmp_path / "shop")
    else:
        load_dataset("shop", data_dir=tmp_path / "shop")


def test_leakage_names_both_places(tmp_path, tokenizer):
    report = check_folder(write(tmp_path / "shop", with_rows("test.csv", (3, [6, 1], 31))), tokenizer=tokenizer)
    (finding,) = report.findings
    assert "1 window(s) in two splits" in finding.summary and "train & test: 1" in finding.summary
    assert finding.examples == ["user 3, item_ids [6, 1]: train.csv line 4; test.csv line 4"]


def test_without_user_column_shared_windows_are_a_warning(tmp_path, tokenizer):
    folder = write(tmp_path / "shop", with_rows("test.csv", (3, [6, 1], 31)))
    for name in ("train.csv", "valid.csv", "test.csv"):   # drop the user_id column
        lines = (folder / name).read_text().splitlines()
        (folder / name).write_text("\n".join(line.split(",", 1)[1] for line in lines) + "\n")
    report = check_folder(folder, tokenizer=tokenizer)
    assert found(report) == {("leakage", WARNING)} and "maybe two users" in report.findings[0].summary


def test_missing_items_are_listed_per_file_and_skip_bad_makes_them_warnings(tmp_path, tokenizer):
    folder = write(tmp_path / "shop", with_rows("test.csv", (1, [1, 8, 9], 31), (2, [2, 9], 32)))
    (finding,) = check_folder(folder, tokenizer=tokenizer).findings
    assert "2 row(s) (test.csv: 2) name 2 item id(s) missing from id2name.json (8, 9)" in finding.summary
    assert "refuses the folder" in finding.summary
    assert finding.examples[0].startswith("test.csv, line 4: unknown item id 8")
    assert found(check_folder(folder, skip_bad=True, tokenizer=tokenizer)) == {("missing-items", WARNING)}


def test_blank_title_counts_the_rows_that_use_it(tmp_path, tokenizer):
    report = check_folder(write(tmp_path / "shop", titles={**TITLES, 1: "\u3000"}), tokenizer=tokenizer)
    (finding,) = report.findings
    assert "1 item(s) with a blank title (1), used by 4 row(s) (train.csv: 2, valid.csv: 1, test.csv: 1)" \
        in finding.summary


def test_time_order_counts_the_late_windows(tmp_path, tokenizer):
    report = check_folder(write(tmp_path / "shop", with_rows("valid.csv", (3, [3, 4], 35))), tokenizer=tokenizer)
    (finding,) = report.findings   # valid's 35 is after test's first window (30); ties would be fine
    assert finding.check == "time-order"
    assert finding.summary.startswith("1 valid window(s) later than the earliest test")


def test_html_entities_counts_each_kind(tmp_path, tokenizer):
    titles = {**TITLES, 5: "Risk &amp; Co &#39;90", 6: "Clue &amp; more", 4: "AT&T; R&D"}
    (finding,) = check_folder(write(tmp_path / "shop", titles=titles), tokenizer=tokenizer).findings
    assert finding.summary.startswith("2 title(s) hold HTML entities (&amp; x2, &#39; x1)")   # "&T;" is none


def test_long_titles_use_the_stated_budget(tmp_path, tokenizer):
    folder = write(tmp_path / "shop")
    n = len(tokenizer.encode('"Jenga"'))     # the quoted title, as the decoder generates it
    assert check_folder(folder, tokenizer=tokenizer, max_title_tokens=n).findings == []
    (finding,) = check_folder(folder, tokenizer=tokenizer, max_title_tokens=n - 1).findings
    assert finding.check == "long-titles" and "item 2" in "".join(finding.examples)


@pytest.mark.parametrize("prompt, name, message", [
    (None, "shop", "prompt.json: missing: dataset 'shop' has no built-in prompt template"),
    ({**PROMPT, "history": "Played: {titles}"}, "shop", "placeholder {titles} is never filled"),
    (PROMPT, "toy", "differs from the built-in template of 'toy'"),
])
def test_prompt_problems_are_errors(tmp_path, tokenizer, prompt, name, message):
    report = check_folder(write(tmp_path / name, prompt=prompt), tokenizer=tokenizer)
    assert found(report) == {("prompt", ERROR)} and message in report.findings[0].summary


def test_missing_split_file_is_an_error(tmp_path, tokenizer):
    folder = write(tmp_path / "shop")
    (folder / "valid.csv").unlink()
    report = check_folder(folder, tokenizer=tokenizer)
    assert found(report) == {("files", ERROR)} and "no valid*.csv file" in report.findings[0].summary


def test_command_exit_status_and_report(tmp_path, capsys):
    clean = write(tmp_path / "clean")
    assert check_data.main([str(clean)]) == 0
    assert "Result: 0 error(s), 0 warning(s): exit status 0." in capsys.readouterr().out
    warned = write(tmp_path / "warned", titles={**TITLES, 7: "Monopoly"})
    assert check_data.main([str(warned)]) == 0
    assert "| unused-items | warning |" in capsys.readouterr().out
    leaked = write(tmp_path / "leaked", with_rows("valid.csv", (3, [6, 1], 21)))
    assert check_data.main([str(leaked), "--dataset", "games"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("# Dataset check: games") and "| leakage | error |" in out
    assert "## Errors (1)" in out and "Result: 1 error(s), 0 warning(s): exit status 1." in out
    with pytest.raises(SystemExit) as e:
        check_data.main([str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "not a folder" in capsys.readouterr().err
