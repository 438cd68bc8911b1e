"""Dataset loading (line-numbered errors, file choice, subsampling), `prepare` on tiny raw files
written here in the 2014 formats, resumable download against a local HTTP server, and the real Toy data."""

import gzip
import http.server
import json
import random
import threading
from pathlib import Path

import pytest

from nanogdrt.data import DataError, Interaction, load_dataset, prepare, preprocess
from nanogdrt import data

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
    for hint in ("python -m nanogdrt.data prepare toy", "--data-dir", "--dataset synthetic"):
        assert hint in str(e.value)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("movies")


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


BAD_ROWS = [  # (data line, part of the message)
    ('2,"[1, 2",14', "not a Python literal"),
    ('2,"[1, 99]",14', "unknown item id 99"),
    ('2,"[3]",14', "empty history"),
    ('2,"[]",14', "empty history"),
    ('2,"{1: 2}",14', "not a list"),
    ('2,"[1, \'a\']",14', "not an integer"),
    ('2,"[1, 6]",14', "has no title"),
    ('2,"[1, 2]",14,extra', "wrong number of fields"),
    ('2', "wrong number of fields"),
    ('2,"__import__(\'os\')",1', "not a Python literal"),  # literal_eval, never eval
]


@pytest.mark.parametrize("line, message", BAD_ROWS)
def test_bad_row_names_file_and_line(tmp_path, line, message):
    titles = {**TITLES, 6: "  "}
    folder = write_folder(tmp_path / "toy", {**GOOD, "valid.csv": [GOOD["valid.csv"][0], line]}, titles)
    with pytest.raises(DataError, match=message) as e:
        load_dataset("toy", data_dir=folder)
    assert e.value.file.endswith("valid.csv") and e.value.line == 3  # header = line 1
    assert "valid.csv, line 3" in str(e.value)
    ds = load_dataset("toy", data_dir=folder, skip_bad=True)
    assert ds.valid == [Interaction([1], 2, 0)]
    assert ds.skipped["valid.csv"] == 1 and "valid.csv, line 3" in ds.skipped["messages"][0]


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


# ----------------------------------------------------------------------------- prepare

def write_raw(raw_dir, category="Toys_and_Games"):
    """6 users x 12 items that survive; an untitled item, and a user/item pair that needs 2 rounds."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    asins = [f"B{j:02d}" for j in range(12)]
    reviews = [(f"U{u}", asins[j], 1000 * j + 10 * u) for u in range(6) for j in range(12)]
    reviews += [(f"U{u}", "NOTITLE", 5 + u) for u in range(6)]               # dropped: no title
    reviews += [("WEAK", a, 7) for a in asins[:3]] + [("WEAK", "EXTRA", 7)]  # 4 reviews: dropped
    reviews += [(f"U{u}", "EXTRA", 50_000) for u in range(4)]               # 5, then 4 after WEAK goes
    random.Random(0).shuffle(reviews)  # the file is not in time order
    with gzip.open(raw_dir / f"reviews_{category}_5.json.gz", "wt") as f:
        for user, asin, time in reviews:
            f.write(json.dumps({"reviewerID": user, "asin": asin, "overall": 5.0, "unixReviewTime": time}) + "\n")
    metas = [{"asin": a, "title": f"Toy {a} &amp; Co", "price": 9.99} for a in asins + ["EXTRA"]]
    metas.append({"asin": "NOTITLE", "categories": [["Toys & Games"]]})
    with gzip.open(raw_dir / f"meta_{category}.json.gz", "wt") as f:
        f.write("".join(repr(m) + "\n" for m in metas))  # Python literals (single quotes), as the source
    return asins


def test_prepare_from_raw_files(tmp_path, capsys):
    asins = write_raw(tmp_path / "raw")
    out = prepare("toy", raw_dir=tmp_path / "raw", out=tmp_path / "toy")
    id2name = json.loads((out / "id2name.json").read_text())
    # untitled, too-sparse (after the 2nd round) items are gone; new ids are consecutive from 1
    assert id2name == {str(j + 1): f"Toy {a} &amp; Co" for j, a in enumerate(asins)}  # entities kept
    assert (out / "test.csv").read_text().splitlines()[0].startswith("user_id,item_ids,")
    ds = load_dataset("toy", data_dir=out)
    # 6 users x 12 items -> 8 windows each (the first 4 items are only history) = 48 -> 38 / 4 / 6
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (38, 4, 6)
    assert [len(x.history) for x in ds.train[:6]] == [4] * 6  # targets at time 4000 + 10u come first
    assert all(x.history == list(range(2, 12)) and x.target == 12 for x in ds.test)  # at most 10 history
    assert all(x.history == list(range(1, 11)) and x.target == 11 for x in ds.valid)
    assert "12 items" in capsys.readouterr().out


def test_preprocess_book_sampling_and_k_core():
    titles = {f"I{i}": f"Book {i}" for i in range(30)}
    reviews = [(f"U{u}", f"I{i}", u + i) for u in range(12) for i in range(30)]
    id2name, splits = preprocess(titles, reviews, book_items=20, seed=0)
    assert len(id2name) == 20  # 20 random items kept, all then pass the 5-core filter
    assert id2name != preprocess(titles, reviews, book_items=20, seed=1)[0]
    assert id2name == preprocess(titles, reviews, book_items=20, seed=0)[0]
    assert sum(len(s) for s in splits.values()) == 12 * (20 - 4)
    assert data.k_core([("a", "x", 0)] * 4 + [("b", "y", 0)] * 5) == [("b", "y", 0)] * 5


# ----------------------------------------------------------------------------- download

PAYLOAD = bytes(range(256)) * 300


class RangeHandler(http.server.BaseHTTPRequestHandler):
    honour_range = True
    ranges = []

    def do_GET(self):
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        start = int(header.split("=")[1].rstrip("-")) if header and self.honour_range else 0
        if start >= len(PAYLOAD):
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        self.wfile.write(PAYLOAD[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    def start(honour_range):
        handler = type("Handler", (RangeHandler,), {"honour_range": honour_range, "ranges": []})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_port}/file.gz", handler
    servers = []
    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("honour_range", [True, False])
def test_download_resumes_a_part_file(tmp_path, server, honour_range):
    url, handler = server(honour_range)
    dest = tmp_path / "file.gz"
    Path(str(dest) + ".part").write_bytes(PAYLOAD[:1000])
    data.download(url, dest)
    assert dest.read_bytes() == PAYLOAD and not Path(str(dest) + ".part").exists()
    assert handler.ranges == ["bytes=1000-"]  # asked to resume; a server that ignores it restarts
    data.download(url, tmp_path / "fresh.gz")  # no .part: a plain GET
    assert (tmp_path / "fresh.gz").read_bytes() == PAYLOAD and handler.ranges[-1] is None


def test_download_complete_part_file(tmp_path, server):
    url, _ = server(True)
    Path(str(tmp_path / "f.gz") + ".part").write_bytes(PAYLOAD)  # complete but not renamed: 416
    data.download(url, tmp_path / "f.gz")
    assert (tmp_path / "f.gz").read_bytes() == PAYLOAD


# ----------------------------------------------------------------------------- the real Toy data

def test_real_toy_data(toy_dir):
    ds = load_dataset("toy", data_dir=toy_dir)  # every row's items known, or this raises
    assert len(ds.titles) == 11_758 and ds.skipped == {}
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (5_000, 4_793, 4_794)  # train_5000: largest
    assert len(load_dataset("toy", data_dir=toy_dir, train_file="train_1000.csv").train) == 1_000
    for split in (ds.train, ds.valid, ds.test):
        assert all(4 <= len(x.history) <= 10 for x in split)  # 5 to 11 item ids per row
