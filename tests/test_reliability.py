"""What nanogdrt promises (docs/promises.md), one family per section: arguments are checked before
any work, empty or degenerate data is found before training, file-system problems are one line
up front, one run per output folder with atomic files, and `prepare` fails clearly."""

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import recommend as recommend_cli
from nanogdrt import files, grouping, relevance
from nanogdrt.analysis import analyze, plots
from nanogdrt.infra import prepare, run_folder, validate
from nanogdrt.data import DataError, load_dataset
from nanogdrt.checkpoint import load_safetensors_folder
from nanogdrt.infra.resume import claim_run_folder

ROOT = Path(__file__).resolve().parents[1]
HEADER = "user_id,item_ids,timestamp\n"
ROWS = {"train.csv": ['0,"[1, 2, 3]",10', '1,"[2, 3, 4, 5]",11'],
        "valid.csv": ['0,"[1, 2]",12'], "test.csv": ['1,"[3, 4, 5, 1]",13']}
TITLES = {"1": "Uno", "2": "Jenga", "3": "Lego", "4": "Chess", "5": "Go"}


@pytest.fixture(autouse=True)
def private_relevance_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGDRT_CACHE", str(tmp_path / "cache"))


def write_folder(folder, rows=ROWS, titles=TITLES, header=HEADER):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "id2name.json").write_text(titles if isinstance(titles, str) else json.dumps(titles),
                                         encoding="utf-8")
    for name, lines in rows.items():
        (folder / name).write_text(header + "".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------- 1. arguments

@pytest.mark.parametrize("flag, value, message", [
    ("--beams", "0", "--beams 0: must be >= 1"),
    ("--eval-batch-size", "0", "--eval-batch-size 0: must be >= 1"),
    ("--batch-size", "0", "--batch-size 0: must be >= 1"),
    ("--grad-accum", "-2", "--grad-accum -2: must be >= 1"),
    ("--save-every", "0", "--save-every 0: must be >= 1"),
    ("--epochs", "0", "--epochs 0: must be >= 1"),
    ("--max-steps", "0", "--max-steps 0: must be >= 1"),
    ("--train-samples", "0", "--train-samples 0: must be >= 1"),
    ("--tau", "0", "--tau 0.0: must be > 0"),
    ("--lr", "nan", "--lr nan: must be a finite number"),
    ("--lora-dropout", "1", "--lora-dropout 1.0: must be >= 0 and < 1"),
    ("--device", "gpu", "--device gpu: expected cpu . mps . cuda"),
])
def test_train_refuses_out_of_range_flags_before_any_work(train_py, tmp_path, flag, value, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        train_py("--model", tmp_path / "no-model-needed", "--out", out, flag, value)
    assert not out.exists()                              # refused before any file or model work


def test_every_range_is_declared_once_and_shown_in_help(train_py, capsys):
    train_py("--help")
    assert "[>= 1]" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--dataset toys: dataset 'toys' not found: it is not built in "
                                         r"\(toy, clothing, book, synthetic, controlled\), and data/toys has no"):
        train_py("--dataset", "toys")
    with pytest.raises(SystemExit, match="--dataset ../toy: expected"):
        train_py("--dataset", "../toy")
    assert validate.problem(3, min=1) is None and validate.describe(min=0, below=1) == ">= 0 and < 1"


@pytest.mark.parametrize("argv, message", [
    (["--users", "0"], "argument --users: 0: must be >= 1"),
    (["--users", "-3"], "argument --users: -3: must be >= 1"),
    (["--rows", "10:5"], "argument --rows: '10:5': START must be < END"),
    (["--rows", "a:b"], "argument --rows: 'a:b': expected START:END"),
    (["--beams", "0"], "argument --beams: 0: must be >= 1"),
])
def test_recommend_flags_name_the_flag(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        recommend_cli.main(argv + ["--out", str(tmp_path / "r.jsonl")])
    assert message in capsys.readouterr().err


def test_analyze_and_prepare_flags_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        analyze.main(["--min-count", "0", "--out", str(tmp_path / "f")])
    assert "argument --min-count: 0: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare.main(["toy", "--seed", "-1", "--out", str(tmp_path / "toy")])
    assert "argument --seed: -1: must be >= 0" in capsys.readouterr().err


def test_more_groups_than_distinct_relevance_values_is_an_error_with_both_numbers():
    values = [torch.tensor([0.1, 0.2]), torch.tensor([0.2, 0.3])]       # 3 distinct values
    with pytest.raises(ValueError, match="--groups 500: .* only 3 distinct .* --groups <= 3"):
        grouping.token_groups(values, 500)
    assert torch.cat(grouping.token_groups(values, 3)).tolist() == [3, 2, 2, 1]


def test_json_outputs_are_strict(tmp_path):
    files.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), 1.5]})
    files.write_jsonl(tmp_path / "r.jsonl", [{"x": float("-inf")}])
    strict = {"parse_constant": lambda token: pytest.fail(f"non-JSON token {token}")}
    assert json.loads((tmp_path / "r.json").read_text(), **strict) == {"a": None, "b": [None, 1.5]}
    assert json.loads((tmp_path / "r.jsonl").read_text(), **strict) == {"x": None}


# ----------------------------------------------------------------------------- 2. data

@pytest.mark.parametrize("empty", ["train.csv", "valid.csv", "test.csv"])
def test_header_only_split_is_found_naming_the_file(tmp_path, empty):
    folder = write_folder(tmp_path / "d", {**ROWS, empty: []})
    with pytest.raises(DataError, match=f"{empty}: no data rows"):
        load_dataset("toy", data_dir=folder)


def test_all_rows_skipped_is_no_data_either(tmp_path):
    folder = write_folder(tmp_path / "d", {**ROWS, "test.csv": ['0,"[9, 9]",1']})
    with pytest.raises(DataError, match=r"test.csv: no data rows \(1 skipped as bad\)"):
        load_dataset("toy", data_dir=folder, skip_bad=True)


def test_repeated_column_and_bom(tmp_path):
    folder = write_folder(tmp_path / "d", header="user_id,item_ids,item_ids\n",
                          rows={k: [v + ',"[1, 2]"' for v in lines] for k, lines in ROWS.items()})
    with pytest.raises(DataError, match=r"line 1: repeated column name\(s\) \['item_ids'\]"):
        load_dataset("toy", data_dir=folder)
    folder = write_folder(tmp_path / "bom", header="\ufeffitem_ids,user_id,timestamp\n",
                          rows={k: [f'"{v.split(chr(34))[1]}",0,1' for v in lines] for k, lines in ROWS.items()})
    assert len(load_dataset("toy", data_dir=folder).train) == 2


@pytest.mark.parametrize("titles, message", [
    ('{"1": "Uno", "\u0667": "Jenga"}', "entry '\u0667': expected a plain decimal integer id"),
    ('{"1": "Uno", " 2": "Jenga"}', "entry ' 2': expected a plain decimal integer id"),
    ('{"7": "Uno", "07": "Jenga"}', "entry '07'"),                  # a leading zero is not plain
    ('{"7": "Uno", "7": "Jenga"}', "keys '7' and '7' both name item 7"),
    ('{}', "no items"),
])
def test_id2name_keys_are_plain_and_unique(tmp_path, titles, message):
    folder = write_folder(tmp_path / "d", titles=titles)
    with pytest.raises(DataError, match=f"id2name.json: {message}"):
        load_dataset("toy", data_dir=folder)


def test_special_token_text_in_a_title_is_plain_text(tokenizer):
    from nanogdrt.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer, "toy")
    specials = {tokenizer.backend.token_to_id(t) for t in ("<|im_end|>", "<|im_start|>")}   # <|im_end|> = EOS
    ids = builder.target_ids("Toy <|im_end|> Box")
    assert not specials & set(ids[:-1]) and ids[-1] == tokenizer.eos_id   # the only EOS is the real one
    assert tokenizer.decode(ids[:-1]) == '"Toy <|im_end|> Box"'
    prompt = builder.build(["A <|im_start|> title"], "Toy <|im_end|> Box")
    assert not specials & set(prompt.ids[:-1])


def test_nan_weights_name_the_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(2), "b.weight": torch.tensor([1.0, float("nan")])},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors: tensor 'b.weight' contains NaN"):
        load_safetensors_folder(tmp_path)


def test_empty_test_split_stops_train_before_model_work(train_py, tmp_path):
    folder = write_folder(tmp_path / "d", {**ROWS, "test.csv": []})
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="test.csv: no data rows"):
        train_py("--dataset", "toy", "--data-dir", folder, "--train-file", "train.csv",
                 "--model", tmp_path / "no-model", "--out", out)
    assert not (out / "state").exists() and not (out / "best_adapter").exists()


# ----------------------------------------------------------------------------- 3. file system

@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_line_before_work(train_py, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro / "run", ro):
            with pytest.raises(SystemExit, match=f"--out {out}: folder {ro} is not writable"):
                train_py("--model", tmp_path / "no-model", "--out", out)
    finally:
        ro.chmod(0o755)


def test_unwritable_out_is_one_line_whoever_runs_it(train_py, tmp_path, monkeypatch):
    """The same check as above, for a test run as root (who may write anywhere)."""
    real_access = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    with pytest.raises(SystemExit, match=f"--out {tmp_path / 'a' / 'b'}: folder {tmp_path} is not writable"):
        train_py("--model", tmp_path / "no-model", "--out", tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_or_folder(train_py, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit, match="exists and is not a folder"):
        train_py("--model", tmp_path / "no-model", "--out", tmp_path / "f")
    with pytest.raises(SystemExit):
        recommend_cli.main(["--out", str(tmp_path)])
    assert f"--out {tmp_path}: is a folder, expected a file path" in capsys.readouterr().err
    with pytest.raises(files.OutputError):
        with files.atomic_path(tmp_path) as tmp:
            Path(tmp).write_text("never")
    with pytest.raises(RuntimeError):           # a failing writer leaves no temporary file behind
        with files.atomic_path(tmp_path / "x.json"):
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_is_a_warning_and_keeps_the_result(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from nanogdrt.llama import Llama
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.tokenizer import Tokenizer

    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        model = Llama.from_pretrained(tiny_model_dir)
        builder = PromptBuilder(Tokenizer(tiny_model_dir), "toy")
        out = relevance.load_or_compute(model, builder, "toy", ["Uno", "Jenga"], cache)
    finally:
        cache.chmod(0o755)
    assert len(out) == 2 and "warning: relevance cache not written" in capsys.readouterr().out
    assert list(cache.iterdir()) == []


# ----------------------------------------------------------------------------- 4. lock and atomic files

LOCKER = textwrap.dedent("""
    import sys, time
    from nanogdrt.infra.resume import claim_run_folder
    lock = claim_run_folder(sys.argv[1], resume=False)
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_run_on_a_folder_is_refused_with_the_first_ones_pid(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", LOCKER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {first.pid}\)"):
            claim_run_folder(out, resume=False)
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the dead run's lock: its lock file is stale and the next run takes it.
    lock = claim_run_folder(out, resume=False)
    assert (out / run_folder.LOCK_NAME).read_text().strip() == str(os.getpid())
    lock.release()


def test_resume_cleans_stale_state_folders(tmp_path):
    out = tmp_path / "run"
    for name in ("state", "state.old", "state.tmp"):
        (out / name).mkdir(parents=True)
        (out / name / "trainer_state.json").write_text("{}")
    claim_run_folder(out, resume=True).release()
    assert sorted(p.name for p in out.iterdir()) == [run_folder.LOCK_NAME, "state"]
    with pytest.raises(SystemExit, match="no checkpoint"):
        claim_run_folder(tmp_path / "fresh", resume=True)


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    png = tmp_path / "g.png"
    plots.group_distribution({"a": [0.5, 0.5]}, png)
    before = png.read_bytes()
    assert before[:4] == b"\x89PNG"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt                     # as a kill mid-save
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        plots.group_distribution({"a": [0.2, 0.8]}, png)
    assert png.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]


# ----------------------------------------------------------------------------- 5. prepare

def test_prepare_fails_clearly(tmp_path, monkeypatch):
    # --raw-dir that does not exist: named, not created, no download attempted.
    with pytest.raises(SystemExit, match="--raw-dir .*missing: no such folder"):
        prepare.main(["toy", "--raw-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "toy")])
    assert not (tmp_path / "missing").exists()

    # No network: one line with the file, the URL and what to do.
    def offline(*args, **kwargs):
        raise prepare.urllib.error.URLError("no network")
    monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(SystemExit, match="reviews_Toys_and_Games_5.json.gz: not found, and downloading .* "
                                         "failed \\(no network\\). Download it by hand"):
        prepare.main(["toy", "--raw-dir", str(raw), "--out", str(tmp_path / "toy")])

    # 0-byte, not gzip, truncated gzip.
    reviews, meta = raw / "reviews_Toys_and_Games_5.json.gz", raw / "meta_Toys_and_Games.json.gz"
    with gzip.open(meta, "wt") as f:
        f.write(repr({"asin": "A", "title": "T"}) + "\n")
    for content, message in [(b"", "empty file"), (b"plain text\n", "not a complete gzip"),
                             (gzip.compress(b"".join(b'{"reviewerID": "u%d", "asin": "A", "unixReviewTime": %d}\n' % (i, i) for i in range(2000)))[:3000], "not a complete gzip")]:
        reviews.write_bytes(content)
        with pytest.raises(SystemExit, match=f"{reviews.name}: {message}"):
            prepare.main(["toy", "--raw-dir", str(raw), "--out", str(tmp_path / "toy")])

    # Parsable but too small: an empty result is an error, and nothing is written.
    with gzip.open(reviews, "wt") as f:
        f.write(json.dumps({"reviewerID": "u", "asin": "A", "unixReviewTime": 1}) + "\n")
    with pytest.raises(SystemExit, match="would have no windows"):
        prepare.main(["toy", "--raw-dir", str(raw), "--out", str(tmp_path / "toy")])
    assert not (tmp_path / "toy").exists()


def test_prepared_folder_trains_with_defaults(tmp_path):
    """prepare writes train_1000.csv (a seeded sample), the file `--dataset toy` reads by default."""
    from test_prepare import write_raw

    write_raw(tmp_path / "raw")
    out = prepare.prepare("toy", raw_dir=tmp_path / "raw", out=tmp_path / "toy")
    sample = load_dataset("toy", data_dir=out, train_file="train_1000.csv")
    full = load_dataset("toy", data_dir=out, train_file="train.csv")
    assert [(x.history, x.target) for x in sample.train] == [(x.history, x.target) for x in full.train]


def test_unwritable_cache_is_a_warning_whoever_runs_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from nanogdrt.llama import Llama
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.tokenizer import Tokenizer

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(files.tempfile, "mkstemp", refused)
    model = Llama.from_pretrained(tiny_model_dir)
    out = relevance.load_or_compute(model, PromptBuilder(Tokenizer(tiny_model_dir), "toy"), "toy",
                                    ["Uno", "Jenga"], tmp_path / "cache")
    assert len(out) == 2 and "relevance cache not written" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 6. real data runs (family 1)

BOOK_DIR = ROOT.parent / "shared" / "data" / "book"


def test_blank_titles_are_refused_before_any_model_work_or_leave_the_catalogue(train_py, tmp_path):
    """A blank title (here zero-width and ideographic spaces, one used by a window and one not)
    stops train.py in one line naming the items and --skip-bad, before the model is read."""
    folder = write_folder(tmp_path / "d", {**ROWS, "train.csv": ROWS["train.csv"] + ['2,"[1, 6]",14']},
                          {**TITLES, "6": "\u200b\u3000", "7": " \ufeff"})
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"id2name.json: items 6, 7: blank title .*--skip-bad") as e:
        train_py("--dataset", "toy", "--data-dir", folder, "--train-file", "train.csv",
                 "--model", tmp_path / "no-model", "--out", out)
    assert "\n" not in str(e.value.code) and not (out / "state").exists()
    ds = load_dataset("toy", data_dir=folder, skip_bad=True)
    assert sorted(ds.titles) == [1, 2, 3, 4, 5] and ds.skipped["id2name.json"] == 2 and ds.skipped["train.csv"] == 1


@pytest.mark.skipif(not (BOOK_DIR / "id2name.json").is_file(), reason=f"Books data not found at {BOOK_DIR}")
def test_books_trains_validates_and_tests_with_skip_bad(train_py, tiny_model_dir, tmp_path):
    """The paper's Books split as shipped (item 5746 has the title "") runs end to end with
    --skip-bad: the item leaves the catalogue and its 32 training windows are counted."""
    out = tmp_path / "book"
    train_py("--dataset", "book", "--data-dir", BOOK_DIR, "--skip-bad", "--model", tiny_model_dir,
             "--train-samples", 16, "--valid-users", 4, "--test-users", 4, "--epochs", 1, "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["items"] == 6_343 and results["dataset"]["skipped"]["id2name.json"] == 1
    assert results["dataset"]["skipped"]["train.csv"] == 32 and len(results["epochs"]) == 1
    assert "NDCG@5" in results["test"] and (out / "best_adapter").is_dir()


# ----------------------------------------------------------------------------- 7. decoding errors (family 3)

def test_a_bad_byte_skips_or_names_exactly_its_own_line(tmp_path):
    """A non-UTF-8 byte in row 1,000 of 2,000 (past the decoder's read-ahead buffer): the error
    names line 1,001 (header = 1), and --skip-bad drops that one row and counts one."""
    folder = write_folder(tmp_path / "d")
    lines = [f'{u},"[1, 2, {3 + u % 3}]",{u}'.encode() for u in range(2000)]
    lines[999] = b'999,"[1, 2, 3]",caf\xe9'                              # latin-1, not UTF-8
    (folder / "train.csv").write_bytes(HEADER.encode() + b"".join(line + b"\n" for line in lines))
    with pytest.raises(DataError, match=r"train.csv, line 1001: not UTF-8 text \(byte 0xe9\) .*--skip-bad"):
        load_dataset("toy", data_dir=folder)
    ds = load_dataset("toy", data_dir=folder, skip_bad=True)
    assert len(ds.train) == 1999 and ds.skipped["train.csv"] == 1 and 999 not in [x.row for x in ds.train]
    assert "train.csv, line 1001" in ds.skipped["messages"][0]


def test_a_bad_byte_in_id2name_or_a_header_names_its_line(tmp_path):
    folder = write_folder(tmp_path / "d")
    (folder / "id2name.json").write_bytes(b'{"1": "Uno",\n "2": "Jenga",\n "3": "Caf\xe9", "4": "Chess", "5": "Go"}')
    with pytest.raises(DataError, match=r"id2name.json, line 3: not UTF-8 text \(byte 0xe9"):
        load_dataset("toy", data_dir=folder)
    folder = write_folder(tmp_path / "h")
    (folder / "valid.csv").write_bytes(b"user_id,item_ids,t\xffime\n" + b'0,"[1, 2]",12\n')
    with pytest.raises(DataError, match=r"valid.csv, line 1: unreadable header: not UTF-8 text \(byte 0xff\)"):
        load_dataset("toy", data_dir=folder, skip_bad=True)


# ----------------------------------------------------------------------------- 8. one line before work (family 4)

@pytest.mark.parametrize("device, message", [("cuda", "--device cuda: CUDA is not available"),
                                             ("cuda:3", "--device cuda:3: CUDA is not available"),
                                             ("mps", "--device mps: MPS .* is not available")])
def test_a_device_this_machine_lacks_is_one_line_before_work(train_py, tmp_path, capsys, monkeypatch,
                                                            device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        train_py("--model", tmp_path / "no-model", "--out", out, "--device", device)
    assert not out.exists()
    with pytest.raises(SystemExit):
        recommend_cli.main(["--device", device, "--out", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()[-1]               # argparse's one-line error
    assert "argument --device" in err and "not available" in err


def test_an_assistant_that_is_not_a_sasrec_run_is_one_line(tiny_model_dir, tmp_path, capsys):
    """A Llama folder has SASRec's two file names (config.json, model.safetensors): its fields tell."""
    with pytest.raises(SystemExit):
        recommend_cli.main(["--assistant", str(tiny_model_dir), "--out", str(tmp_path / "r.jsonl")])
    assert (f"argument --assistant: {tiny_model_dir}: not a SASRec run folder: its config.json is not a "
            f"SASRec config" in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        recommend_cli.main(["--assistant", str(tmp_path / "none"), "--out", str(tmp_path / "r.jsonl")])
    assert "argument --assistant" in capsys.readouterr().err


def test_lora_targets_and_rank_are_checked_against_config_json_only(tiny_model_dir, tmp_path):
    """validate.check_lora builds the model on the meta device: no weights are read (here there
    are none), so a typo in --lora-targets costs one line, not the data, model and Eq. 3 first."""
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(validate.ArgumentError, match=r"--lora-targets nonexistent_proj: target_modules "
                                                     r"\['nonexistent_proj'\] match no module .*v_proj"):
        validate.check_lora(tmp_path, ["nonexistent_proj"], 8)
    with pytest.raises(validate.ArgumentError, match=r"--lora-r 40: above the width of .*v_proj \(64 -> 32\).*<= 32"):
        validate.check_lora(tmp_path, ["q_proj", "v_proj"], 40)
    validate.check_lora(tmp_path, ["q_proj", "v_proj"], 32)
    validate.check_lora(tmp_path / "absent", ["nonexistent_proj"], 8)        # no config.json: the loader says so


def test_adapters_of_the_wrong_kind_or_base_model_are_refused_before_data(tiny_model_dir, tmp_path):
    from nanogdrt.llama import Llama
    from nanogdrt.lora import LoRAConfig, inject_lora, save_adapter

    model = Llama.from_pretrained(tiny_model_dir)
    inject_lora(model, LoRAConfig(r=2))
    save_adapter(model, tmp_path / "other", LoRAConfig(r=2), "HuggingFaceTB/SmolLM2-1.7B-Instruct")
    save_adapter(model, tmp_path / "same", LoRAConfig(r=2), "/elsewhere/" + tiny_model_dir.name)
    assert oct((tmp_path / "same" / "adapter_model.safetensors").stat().st_mode & 0o777) == "0o644"
    # --dataset toy without a folder would raise FileNotFoundError: these come before the data.
    argv = ["--model", str(tiny_model_dir), "--dataset", "toy", "--data-dir", str(tmp_path / "none"),
            "--out", str(tmp_path / "r.jsonl")]
    with pytest.raises(ValueError, match="adapter trained on base model 'HuggingFaceTB/SmolLM2-1.7B-Instruct'"
                                         ".*pass --model"):
        recommend_cli.main(argv + ["--adapter", str(tmp_path / "other")])
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found .expected a PEFT adapter folder"):
        recommend_cli.main(argv + ["--adapter", str(tiny_model_dir)])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):   # same base, moved: accepted
        recommend_cli.main(argv + ["--adapter", str(tmp_path / "same")])


def test_empty_out_is_refused_not_read_as_the_current_folder(tmp_path, capsys):
    with pytest.raises(files.OutputError, match="--out '': empty path"):
        run_folder.check_writable("", "folder")
    with pytest.raises(SystemExit):
        recommend_cli.main(["--out", ""])
    assert "--out '': empty path (name a file)" in capsys.readouterr().err


def test_a_refused_run_leaves_no_folder_and_outputs_are_0644(train_py, tiny_model_dir, tmp_path):
    out = tmp_path / "a" / "run"
    with pytest.raises(SystemExit, match="dataset 'toy' not found"):
        train_py("--dataset", "toy", "--data-dir", tmp_path / "none", "--model", tmp_path / "no-model", "--out", out)
    assert list(tmp_path.iterdir()) == []                  # neither run/ nor a/ (both made by the lock)
    (tmp_path / "mine").mkdir()
    claim_run_folder(tmp_path / "mine", resume=False).release()
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []   # the user's folder stays

    from nanogdrt.infra.resume import save_state
    from nanogdrt.llama import Llama
    from nanogdrt.lora import LoRAConfig, inject_lora, lora_parameters

    model = Llama.from_pretrained(tiny_model_dir)
    inject_lora(model, LoRAConfig(r=2))
    optimizer = torch.optim.AdamW(lora_parameters(model))
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    save_state(tmp_path / "state", model, optimizer, {"step": 1}, LoRAConfig(r=2), LoRAConfig(r=2))
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "state").iterdir()} == dict.fromkeys(
        ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors",
         "trainer_state.json"], "0o644")


def test_analyze_on_a_run_without_epochs_is_one_line_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    files.write_json(run / "results.json", {"config": {"method": "sft"}, "epochs": [], "test": {},
                                            "test_target_group_distribution": [], "steps": []})
    with pytest.raises(SystemExit, match=r"results.json: no epochs \(the run ended before its first validation"):
        analyze.main(["--runs", str(run), "--out", str(tmp_path / "figures")])
    assert not (tmp_path / "figures").exists()


@pytest.mark.parametrize("meta_line, review_line, message", [
    ("['A', 'T']\n", None, "meta_Toys_and_Games.json.gz, line 1: expected a Python dict literal with a string 'asin'"),
    ("{'asin': ['A'], 'title': 'T'}\n", None, "line 1: expected a Python dict literal with a string 'asin'"),
    (None, '{"reviewerID": ["u"], "asin": "A", "unixReviewTime": 1}\n',
     "reviews_Toys_and_Games_5.json.gz, line 2: bad review line: 'reviewerID' and 'asin' must be strings"),
    (None, b'{"reviewerID": "Jos\xe9", "asin": "A", "unixReviewTime": 1}\n',
     r"reviews_Toys_and_Games_5.json.gz, line 2: not UTF-8 text \(byte 0xe9 at column 20\)"),
])
def test_prepare_names_the_malformed_raw_line(tmp_path, meta_line, review_line, message):
    from test_prepare import write_raw

    raw = tmp_path / "raw"
    write_raw(raw)
    reviews, meta = raw / "reviews_Toys_and_Games_5.json.gz", raw / "meta_Toys_and_Games.json.gz"
    if meta_line:
        meta.write_bytes(gzip.compress(meta_line.encode() + gzip.decompress(meta.read_bytes())))
    if review_line:
        line = review_line if isinstance(review_line, bytes) else review_line.encode()
        lines = gzip.decompress(reviews.read_bytes()).splitlines(keepends=True)
        reviews.write_bytes(gzip.compress(lines[0] + line + b"".join(lines[1:])))
    with pytest.raises(SystemExit, match=message) as e:
        prepare.main(["toy", "--raw-dir", str(raw), "--out", str(tmp_path / "toy")])
    assert "\n" not in str(e.value.code) and not (tmp_path / "toy").exists()


def test_prepare_never_overwrites_a_dataset_folder(tmp_path):
    from test_prepare import write_raw

    write_raw(tmp_path / "raw")
    out = write_folder(tmp_path / "mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match=f"--out {out}: already holds a dataset .*choose another --out"):
        prepare.main(["toy", "--raw-dir", str(tmp_path / "raw"), "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
