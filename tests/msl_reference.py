"""MSL's prompt text and ids, written from MSL's code (WANGBohaO-jpg/MSL: utils.get_prompt,
train_trie_token.generate_list_from_csv / generate_prompt / tokenize), independently of
nanogdrt.prompt: the reference that tests/test_prompt.py and tests/test_tokenizer.py compare to.
"""

# get_prompt(dataset_name) -> (instruction_prompt, history_prompt) for MSL's "Toy",
# "Amazon_Books" and "Clothing" datasets.
GET_PROMPT = {
    "toy": ("Given a list of toys the user has played before, please recommend a new toy that the user "
            "likes to the user.", "The user has played the following toys before: "),
    "book": ("Given a list of books the user has read before, please recommend a new book that the user "
             "likes to the user.", "The user has read the following books before: "),
    "clothing": ("Given a list of clothing the user has worn before, please recommend a new clothing that "
                 "the user likes to the user.", "The user has worn the following clothing before: "),
}


def generate_prompt(data_point: dict) -> str:
    """train_trie_token.generate_prompt, the branch for a non-empty input (always taken)."""
    return (f"Below is an instruction that describes a task, paired with an input that provides further "
            f"context. Write a response that appropriately completes the request. \n\n"
            f"### Instruction:\n{data_point['instruction']}\n\n### Input:\n{data_point['input']}\n\n"
            f"### Response:\n{data_point['output']}")


def msl_text(dataset: str, history: list[str], target: str | None = None, na: bool = False) -> str:
    """generate_list_from_csv's entry, then generate_prompt; target None = the user prompt
    (output ""). na=True: "N/A" in place of the quoted list (our Eq. 2/3 prompt)."""
    instruction, history_prompt = GET_PROMPT[dataset]
    listed = "N/A" if na else ", ".join(f'"{title}"' for title in history)
    output = "" if target is None else f'"{target}"'
    return generate_prompt({"instruction": instruction, "input": f"{history_prompt + listed}\n ", "output": output})


def msl_ids(hf_tokenizer, text: str, add_eos: bool) -> list[int]:
    """MSL's tokenize(prompt, add_eos_token): tokenizer(prompt), then EOS unless already last."""
    ids = hf_tokenizer(text)["input_ids"]
    if add_eos and ids[-1] != hf_tokenizer.eos_token_id:
        ids = ids + [hf_tokenizer.eos_token_id]
    return ids
