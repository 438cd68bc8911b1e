"""`prepare` on tiny raw files written here in the 2014 formats (title filter, repeated 5-core,
Books sampling, windows and split), and the resumable download against a local HTTP server."""

import gzip
import http.server
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nanogdrt.infra import prepare as prep
from nanogdrt.data import load_dataset
from nanogdrt.infra.prepare import prepare, preprocess


# ----------------------------------------------------------------------------- prepare

def write_raw(raw_dir, category="Toys_and_Games"):
    """6 users x 12 items that survive; an item with no title and one with an empty title (as in
    MSL's Books files), a repeated metadata line, and a user/item pair that needs 2 rounds."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    asins = [f"B{j:02d}" for j in range(12)]
    reviews = [(f"U{u}", asins[j], 1000 * j + 10 * u) for u in range(6) for j in range(12)]
    reviews += [(f"U{u}", "NOTITLE", 5 + u) for u in range(6)]               # dropped: no title
    reviews += [(f"U{u}", "EMPTY", 6 + u) for u in range(6)]                 # dropped: empty title
    reviews += [("WEAK", a, 7) for a in asins[:3]] + [("WEAK", "EXTRA", 7)]  # 4 reviews: dropped
    reviews += [(f"U{u}", "EXTRA", 50_000) for u in range(4)]               # 5, then 4 after WEAK goes
    random.Random(0).shuffle(reviews)  # the file is not in time order
    with gzip.open(raw_dir / f"reviews_{category}_5.json.gz", "wt") as f:
        for user, asin, time in reviews:
            f.write(json.dumps({"reviewerID": user, "asin": asin, "overall": 5.0, "unixReviewTime": time}) + "\n")
    metas = [{"asin": a, "title": f"Toy {a} &amp; Co", "price": 9.99} for a in asins + ["EXTRA"]]
    metas.append({"asin": "NOTITLE", "categories": [["Toys & Games"]]})
    metas += [{"asin": "EMPTY", "title": ""}, metas[0]]                     # empty title; a repeated line
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
    printed = capsys.readouterr().out
    assert "12 items" in printed and "dropped items: 2 without a usable title" in printed
    summary = json.loads((out / prep.SUMMARY_FILE).read_text())
    assert summary == {
        "dataset": "toy", "meta_lines_no_title": 1, "meta_lines_empty_title": 1, "meta_lines_repeated_asin": 1,
        "reviews": 92, "items_dropped_untitled": 2, "reviews_dropped_untitled": 12,   # NOTITLE, EMPTY
        "items_dropped_k_core": 1, "reviews_dropped_k_core": 8,                       # EXTRA, WEAK's 4
        "items_sharing_a_title": 0, "items": 12, "reviews_kept": 72,
        "windows": {"train": 38, "valid": 4, "test": 6}}


def test_preprocess_book_sampling_and_k_core():
    titles = {f"I{i}": f"Book {i}" for i in range(30)}
    reviews = [(f"U{u}", f"I{i}", u + i) for u in range(12) for i in range(30)]
    summary = {}
    id2name, splits = preprocess(titles, reviews, book_items=20, seed=0, summary=summary)
    assert summary["items_dropped_book_sample"] == 10 and summary["reviews_dropped_book_sample"] == 120
    assert len(id2name) == 20  # 20 random items kept, all then pass the 5-core filter
    assert id2name != preprocess(titles, reviews, book_items=20, seed=1)[0]
    assert id2name == preprocess(titles, reviews, book_items=20, seed=0)[0]
    assert sum(len(s) for s in splits.values()) == 12 * (20 - 4)
    assert prep.k_core([("a", "x", 0)] * 4 + [("b", "y", 0)] * 5) == [("b", "y", 0)] * 5


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
    prep.download(url, dest)
    assert dest.read_bytes() == PAYLOAD and not Path(str(dest) + ".part").exists()
    assert handler.ranges == ["bytes=1000-"]  # asked to resume; a server that ignores it restarts
    prep.download(url, tmp_path / "fresh.gz")  # no .part: a plain GET
    assert (tmp_path / "fresh.gz").read_bytes() == PAYLOAD and handler.ranges[-1] is None


def test_download_complete_part_file(tmp_path, server):
    url, _ = server(True)
    Path(str(tmp_path / "f.gz") + ".part").write_bytes(PAYLOAD)  # complete but not renamed: 416
    prep.download(url, tmp_path / "f.gz")
    assert (tmp_path / "f.gz").read_bytes() == PAYLOAD


# ----------------------------------------------------------------------------- command line

def test_command_line(tmp_path):
    """`python -m nanogdrt.infra.prepare toy` writes the folder that prepare() writes."""
    write_raw(tmp_path / "raw")
    prepare("toy", raw_dir=tmp_path / "raw", out=tmp_path / "api")
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "nanogdrt.infra.prepare", "toy", "--raw-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "cli")],
                   cwd=root, check=True, capture_output=True)
    for name in ("id2name.json", "train.csv", "valid.csv", "test.csv"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
