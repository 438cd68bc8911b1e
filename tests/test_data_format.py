"""Your own dataset (docs/data_format.md): prompt.json and its checks, dataset names, the committed
example folder, and a folder written from scratch that passes the checker, trains and evaluates."""

import json
from pathlib import Path

import pytest

import recommend as recommend_cli
from nanogdrt.data import DataError, Interaction, load_dataset, load_template
from nanogdrt.infra.check_data import ERROR, check_folder
from nanogdrt.prompt import TEMPLATES, PromptBuilder, Template

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "data_format" / "example"
PROMPT = {"instruction": "Given a list of puzzles the user has solved before, please recommend a new puzzle "
                         "that the user likes to the user.",
          "history": "The user has solved the following puzzles before: {history}"}


def write_dataset(folder, prompt=PROMPT, users=8, items=12):
    """A dataset folder from scratch, as docs/data_format.md describes it: each user's items in time
    order, cut into windows of up to 10 history items + the target, split by the target's time."""
    folder.mkdir(parents=True, exist_ok=True)
    titles = {i: f"Puzzle box number {i} ({'wood' if i % 2 else 'metal'})" for i in range(items)}
    (folder / "id2name.json").write_text(json.dumps({str(i): t for i, t in titles.items()}, indent=1))
    if prompt is not None:
        (folder / "prompt.json").write_text(json.dumps(prompt, indent=1))
    windows = []   # (time, user, item ids): user u plays items u, u+1, ... one per day, from day u
    for user in range(users):
        sequence = [(user + k) % items for k in range(9)]
        for end in range(4, len(sequence)):
            windows.append((86400 * (user + end), user, sequence[max(0, end - 10):end + 1]))
    windows.sort()
    cut = {"train.csv": windows[:30], "valid.csv": windows[30:34], "test.csv": windows[34:]}
    for name, rows in cut.items():
        lines = [f'{user},"{ids}",{time}' for time, user, ids in rows]
        (folder / name).write_text("user_id,item_ids,timestamp\n" + "\n".join(lines) + "\n")
    return folder


# ----------------------------------------------------------------------------- prompt.json and names

def test_own_name_takes_the_template_of_its_prompt_json(tmp_path, tokenizer):
    ds = load_dataset("puzzles", data_dir=write_dataset(tmp_path / "puzzles"))
    assert ds.template == Template(PROMPT["instruction"], "The user has solved the following puzzles before: ")
    text = PromptBuilder(tokenizer, ds.template).text(["A", "B"], "C")
    assert ('### Instruction:\n' + PROMPT["instruction"] + '\n\n### Input:\nThe user has solved the following '
            'puzzles before: "A", "B"\n \n\n### Response:\n"C"') in text
    # the toy template written as a prompt.json is the built-in one: the same prompt ids
    toy = {"instruction": TEMPLATES["toy"].instruction, "history": TEMPLATES["toy"].history + "{history}"}
    (tmp_path / "toy.json").write_text(json.dumps(toy))
    assert load_template(tmp_path / "toy.json") == TEMPLATES["toy"]
    builtin, loaded = PromptBuilder(tokenizer, "toy"), PromptBuilder(tokenizer, load_template(tmp_path / "toy.json"))
    assert loaded.build(["A"], "B") == builtin.build(["A"], "B")


@pytest.mark.parametrize("text, message", [
    ('{"instruction": "x",\n "history": }', r"prompt.json, line 2: invalid JSON"),
    ('["x", "y"]', "expected a JSON object with exactly the keys"),
    ('{"instruction": "x"}', r"exactly the keys \['instruction', 'history'\] \(got \['instruction'\]\)"),
    ('{"instruction": "x", "history": "y: {history}", "title": "z"}', "got \\['history', 'instruction', 'title'\\]"),
    ('{"instruction": 3, "history": "y: {history}"}', "'instruction': expected a non-blank string"),
    ('{"instruction": "\\u200b\\u3000", "history": "y: {history}"}', "'instruction': expected a non-blank string"),
    ('{"instruction": "Recommend {history}", "history": "y: {history}"}', "placeholder {history} is never filled"),
    ('{"instruction": "Recommend a {item}", "history": "y: {history}"}', "placeholder {item} is never filled"),
    ('{"instruction": "x", "history": "Played: {titles}"}', "placeholder {titles} is never filled"),
    ('{"instruction": "x", "history": "Played: "}', "'history': expected a sentence, one space, then {history}"),
    ('{"instruction": "x", "history": "{history} were played"}', "then {history} at the very end"),
    ('{"instruction": "x", "history": "Played:{history}"}', "then {history} at the very end"),
    ('{"instruction": "x", "history": "Played:  {history}"}', "then {history} at the very end"),
    ('{"instruction": "x", "history": " {history}"}', "then {history} at the very end"),
    ('{"instruction": "x", "history": "A {history} B {history}"}', "then {history} at the very end"),
])
def test_bad_prompt_json_is_one_line_naming_the_file(tmp_path, text, message):
    folder = write_dataset(tmp_path / "puzzles")
    (folder / "prompt.json").write_text(text)
    with pytest.raises(DataError, match=message) as e:
        load_dataset("puzzles", data_dir=folder)
    assert e.value.file.endswith("prompt.json") and "\n" not in str(e.value)


def test_own_name_needs_prompt_json_and_builtin_names_keep_their_template(tmp_path):
    folder = write_dataset(tmp_path / "puzzles", prompt=None)
    with pytest.raises(DataError, match=r"puzzles/prompt.json: missing: dataset 'puzzles' has no built-in prompt "
                                        r"template .*docs/data_format.md"):
        load_dataset("puzzles", data_dir=folder)
    assert load_dataset("toy", data_dir=folder).template == TEMPLATES["toy"]     # no prompt.json needed
    (folder / "prompt.json").write_text(json.dumps(PROMPT))
    with pytest.raises(DataError, match="differs from the built-in template of 'book'.*--dataset my-book"):
        load_dataset("book", data_dir=folder)
    book = {"instruction": TEMPLATES["book"].instruction, "history": TEMPLATES["book"].history + "{history}"}
    (folder / "prompt.json").write_text(json.dumps(book))
    assert load_dataset("book", data_dir=folder).template == TEMPLATES["book"]   # the same words: accepted


@pytest.mark.parametrize("name", ["../up", "a b", "", ".hidden", "x/y"])
def test_dataset_names_are_plain(tmp_path, name):
    with pytest.raises(ValueError, match="dataset name"):
        load_dataset(name, data_dir=write_dataset(tmp_path / "puzzles"))


# ----------------------------------------------------------------------------- the example and a run

def test_committed_example_passes_the_checker_and_loads(tokenizer):
    report = check_folder(EXAMPLE, tokenizer=tokenizer)
    assert report.name == "example" and report.findings == []
    ds = load_dataset("example", data_dir=EXAMPLE)
    assert len(ds.titles) == 12 and (len(ds.train), len(ds.valid), len(ds.test)) == (9, 1, 2)
    assert ds.test[0] == Interaction([5, 6, 1, 12, 7, 8], 2, 0)
    assert "board games" in ds.template.history


def test_folder_from_scratch_passes_the_checker_trains_and_evaluates(train_py, tiny_model_dir, tokenizer,
                                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGDRT_CACHE", str(tmp_path / "cache"))
    folder = write_dataset(tmp_path / "data" / "puzzles")
    report = check_folder(folder, tokenizer=tokenizer)
    assert report.count(ERROR) == 0 and report.findings == []
    templates = []
    init = PromptBuilder.__init__
    monkeypatch.setattr(PromptBuilder, "__init__", lambda self, tok, t: templates.append(t) or init(self, tok, t))
    train_py("--model", tiny_model_dir, "--dataset", "puzzles", "--data-dir", folder, "--epochs", "1",
             "--batch-size", "4", "--beams", "3", "--eval-batch-size", "4", "--out", tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["dataset"]["name"] == "puzzles" and res["dataset"]["items"] == 12
    assert (res["dataset"]["train"], res["dataset"]["valid"], res["dataset"]["test"]) == (30, 4, 6)
    assert 0 <= res["test"]["NDCG@5"] <= 1 and 0 <= res["test"]["HR@10"] <= 1
    out = tmp_path / "recs.jsonl"
    recommend_cli.main(["--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run" / "best_adapter"),
                        "--dataset", "puzzles", "--data-dir", str(folder), "--beams", "3", "--out", str(out)])
    assert len(out.read_text().splitlines()) == 6
    expected = Template(PROMPT["instruction"], "The user has solved the following puzzles before: ")
    assert templates and all(t == expected for t in templates)   # train.py and recommend.py alike
