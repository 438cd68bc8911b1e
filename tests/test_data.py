"""Dataset loading (line-numbered errors, file choice, subsampling, windows and the time split) and
the real Toy data. Preparing folders from raw files: tests/test_prepare.py."""

import json

import pytest

from nanogdrt.data import DataError, Interaction, load_dataset, make_windows, split_by_time

TITLES = {1: "Uno", 2: "Jenga", 3: "Lego &amp; Friends", 4: "Chess", 5: "Go"}
HEADER = "user_id,item_ids,timestamp\n"


def write_folder(folder, splits, titles=TITLES):
    """splits: file name -> list of CSV data lines (the header is added)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "id2name.json").write_text(json.dumps({str(k): v for k, v in titles.items()}))
    for name, lines in splits.items():
        (folder / name).write_text(HEADER + "".join(line + "\n" for line in lines))
    return folder


GOOD = {"train.csv": ['0,"[1, 2, 3]",10', '1,"[2, 3, 4, 5]",11'],
        "valid.csv": ['0,"[1, 2]",12'], "test.csv": ['1,"[3, 4, 5, 1]",13']}


def test_load_folder(tmp_path):
    ds = load_dataset("toy", data_dir=write_folder(tmp_path / "toy", GOOD))
    assert ds.name == "toy" and ds.titles == TITLES and ds.skipped == {}
    assert ds.train == [Interaction([1, 2], 3, 0), Interaction([2, 3, 4], 5, 1)]
    assert ds.valid == [Interaction([1], 2, 0)] and ds.test == [Interaction([3, 4, 5], 1, 0)]
    assert ds.source == str(tmp_path / "toy")


def test_folder_lookup_and_missing_message(tmp_path, monkeypatch):
    write_folder(tmp_path / "env" / "book", GOOD)
    monkeypatch.setenv("NANOGDRT_DATA", str(tmp_path / "env"))
    assert load_dataset("book").source == str(tmp_path / "env" / "book")
    monkeypatch.delenv("NANOGDRT_DATA")
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "data" / "clothing", GOOD)
    assert len(load_dataset("clothing").train) == 2  # data/<name> relative to the cwd
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("toy")
    for hint in ("python -m nanogdrt.infra.prepare toy", "--data-dir", "--dataset synthetic"):
        assert hint in str(e.value)
    with pytest.raises(FileNotFoundError, match="data/movies has no id2name.json.*prompt.json"):
        load_dataset("movies")   # a name of your own: its folder, with a prompt.json


def test_train_file_choice(tmp_path):
    splits = dict(GOOD)
    splits["train_1.csv"] = splits.pop("train.csv")[:1]
    splits["train_2.csv"] = GOOD["train.csv"]
    folder = write_folder(tmp_path / "toy", splits)
    assert len(load_dataset("toy", data_dir=folder).train) == 2  # the largest train*.csv
    assert len(load_dataset("toy", data_dir=folder, train_file="train_1.csv").train) == 1
    write_folder(folder, {"train.csv": GOOD["train.csv"][1:]})
    assert load_dataset("toy", data_dir=folder).train == [Interaction([2, 3, 4], 5, 0)]  # train.csv first
    with pytest.raises(FileNotFoundError):
        load_dataset("toy", data_dir=folder, train_file="train_9.csv")


def test_subsampling_is_seeded_and_keeps_order(tmp_path):
    lines = [f'{u},"[1, 2, {3 + u % 3}]",{u}' for u in range(50)]
    folder = write_folder(tmp_path / "toy", {**GOOD, "train.csv": lines})
    a = load_dataset("toy", data_dir=folder, train_samples=10, seed=1)
    assert len(a.train) == 10 and [x.row for x in a.train] == sorted(x.row for x in a.train)
    assert a.train == load_dataset("toy", data_dir=folder, train_samples=10, seed=1).train
    assert a.train != load_dataset("toy", data_dir=folder, train_samples=10, seed=2).train
    assert len(load_dataset("toy", data_dir=folder, train_samples=500).train) == 50


def test_windows_and_time_split():
    seq = [(item, 100 * item) for item in range(1, 17)]          # one user, 16 items in time order
    windows = make_windows({7: seq, 8: seq[:4]})                 # 4 items: history only, no window
    assert [len(h) for _, h, _, _ in windows] == [4, 5, 6, 7, 8, 9, 10, 10, 10, 10, 10, 10]
    assert windows[0] == (7, [1, 2, 3, 4], 5, 500) and windows[-1] == (7, list(range(6, 16)), 16, 1600)
    train, valid, test = split_by_time(list(reversed(windows)))  # sorted by the target's time again
    assert [len(train), len(valid), len(test)] == [9, 1, 2] and train + valid + test == windows
    ties = [("a", [1], 2, 5), ("b", [1], 3, 5), ("c", [1], 4, 1)]
    assert [w[0] for part in split_by_time(ties) for w in part] == ["c", "a", "b"]  # stable on ties


BAD_ROWS = [  # (data line, part of the message)
    ('2,"[1, 2",14', "not a Python literal"),
    ('2,"[1, 99]",14', "unknown item id 99"),
    ('2,"[3]",14', "empty history"),
    ('2,"[]",14', "empty history"),
    ('2,"{1: 2}",14', "not a list"),
    ('2,"[1, \'a\']",14', "not an integer"),
    ('2,"[1, 2]",14,extra', "wrong number of fields"),
    ('2', "wrong number of fields"),
    ('2,"__import__(\'os\')",1', "not a Python literal"),  # literal_eval, never eval
]


@pytest.mark.parametrize("line, message", BAD_ROWS)
def test_bad_row_names_file_and_line(tmp_path, line, message):
    folder = write_folder(tmp_path / "toy", {**GOOD, "valid.csv": [GOOD["valid.csv"][0], line]})
    with pytest.raises(DataError, match=message) as e:
        load_dataset("toy", data_dir=folder)
    assert e.value.file.endswith("valid.csv") and e.value.line == 3  # header = line 1
    assert "valid.csv, line 3" in str(e.value)
    assert "--skip-bad" in str(e.value).splitlines()[0]                  # the error names the remedy
    ds = load_dataset("toy", data_dir=folder, skip_bad=True)
    assert ds.valid == [Interaction([1], 2, 0)]
    assert ds.skipped["valid.csv"] == 1 and "valid.csv, line 3" in ds.skipped["messages"][0]


@pytest.mark.parametrize("blank", ["", "  ", "\u200b", "\u3000\u200d\ufeff", "\u2060\t\u00ad"])
def test_blank_title_is_refused_up_front_or_leaves_the_catalogue(tmp_path, blank):
    """MSL's Books id2name has an item whose title is "" (item 5746). A blank title (zero-width
    and ideographic spaces too) stops the load at id2name.json, before any row, naming the item
    and --skip-bad; with it the item leaves the catalogue, counted, and so do the rows using it,
    and an unused blank item (8) leaves too: it could otherwise be recommended."""
    folder = write_folder(tmp_path / "toy", {**GOOD, "train.csv": GOOD["train.csv"] + ['5,"[1, 7]",20']},
                          {**TITLES, 7: blank, 8: "\u200b \u200c"})
    with pytest.raises(DataError, match="id2name.json: items 7, 8: blank title") as e:
        load_dataset("toy", data_dir=folder)
    assert "--skip-bad" in str(e.value) and "\n" not in str(e.value)
    ds = load_dataset("toy", data_dir=folder, skip_bad=True)
    assert ds.titles == TITLES and ds.skipped["id2name.json"] == 2
    assert ds.skipped["train.csv"] == 1 and all(7 not in x.history + [x.target] for x in ds.train)
    assert "item 7: blank title" in ds.skipped["messages"][0] and "train.csv, line 4" in ds.skipped["messages"][2]


def test_only_blank_titles_is_no_items(tmp_path):
    folder = write_folder(tmp_path / "toy", GOOD, {1: " ", 2: "\u200b"})
    with pytest.raises(DataError, match=r"id2name.json: no items \(2 dropped for a blank title\)"):
        load_dataset("toy", data_dir=folder, skip_bad=True)


def test_skip_bad_counts_and_keeps_row_indices(tmp_path):
    lines = ['0,"[1, 2]",1', '0,"[1]",2', '0,"[2, 3]",3', 'x,"[9, 1]",4', '0,"[3, 4]",5']
    folder = write_folder(tmp_path / "toy", {**GOOD, "test.csv": lines})
    ds = load_dataset("toy", data_dir=folder, skip_bad=True)
    assert [(x.row, x.target) for x in ds.test] == [(0, 2), (2, 3), (4, 4)]
    assert ds.skipped["test.csv"] == 2 and len(ds.skipped["messages"]) == 2
    assert "test.csv, line 3" in ds.skipped["messages"][0] and "line 5" in ds.skipped["messages"][1]


def test_missing_column_and_bad_json(tmp_path):
    folder = write_folder(tmp_path / "toy", GOOD)
    (folder / "test.csv").write_text("user_id,items\n0,\"[1, 2]\"\n")
    for skip_bad in (False, True):  # a missing column is a file-level error: never skipped
        with pytest.raises(DataError, match="missing column 'item_ids'") as e:
            load_dataset("toy", data_dir=folder, skip_bad=skip_bad)
        assert e.value.line == 1 and e.value.file.endswith("test.csv")
    (folder / "id2name.json").write_text('{"1": "Uno",\n "2": }')
    with pytest.raises(DataError, match="id2name.json, line 2"):
        load_dataset("toy", data_dir=folder)


# ----------------------------------------------------------------------------- the real Toy data

def test_real_toy_data(toy_dir):
    ds = load_dataset("toy", data_dir=toy_dir)  # every row's items known, or this raises
    assert len(ds.titles) == 11_758 and ds.skipped == {}
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (5_000, 4_793, 4_794)  # train_5000: largest
    assert len(load_dataset("toy", data_dir=toy_dir, train_file="train_1000.csv").train) == 1_000
    for split in (ds.train, ds.valid, ds.test):
        assert all(4 <= len(x.history) <= 10 for x in split)  # 5 to 11 item ids per row
