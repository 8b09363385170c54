"""Token ids of the official GLUE prompts, for `tests/test_reference_fidelity.py`.

Run (see README.md):
    PYTHONPATH=<site with the official code's dependencies>:<official clone> python benchmarks/official_fixture/make_glue_fixture.py

For each GLUE task the official code supports, a few sentence (pairs) go through the official dataset's own
`__getitem__` (uniperceiver/datasets/task_dataset/GLUE.py of the clone at $UPREF, built without its data files:
the rows are set directly) and the official `ClipTokenizer`; the script stores the input ids it produced, the
position of its `<|spe|>` and the token ids of the label words as the official target-set notebook encodes
them. Writes `tests/fixtures/official_glue_templates.json`; only data enters this repository.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
UPREF = os.environ.get('UPREF', '/tmp/upref')
sys.path.insert(0, HERE)
import official_stubs  # noqa: E402

STUBS_USED = official_stubs.install()

from uniperceiver.datasets.task_dataset.GLUE import GLUEDataset  # noqa: E402
from uniperceiver.tokenization import ClipTokenizer  # noqa: E402

# the official names, their sentence count, and the label words of tools/generate_target_sets.ipynb
# ("the order is crucial": index = the official label id)
TASKS = {
    "SST-2": (1, ["bad", "wonderful"]),
    "CoLA": (1, ["incorrect", "correct"]),
    "RTE": (2, ["no", "yes"]),
    "MRPC": (2, ["no", "yes"]),
    "QQP": (2, ["no", "yes"]),
    "QNLI": (2, ["no", "yes"]),
    "MNLI_Match": (2, ["no", "maybe", "yes"]),
}
# sentences chosen to exercise the official preprocessing: capitals (lower-cased), a final period (dropped
# from the first sentence of most pair tasks), a question mark, an HTML entity, punctuation inside words
FIRST = ["A gripping, well-acted film.", "The cat sat on the mat", "Is it raining in Paris &amp; Lyon?"]
SECOND = ["It was boring.", "A cat is sitting", "The weather in France is wet today."]


def official_example(tokenizer, task_name: str, count: int, sentences: list[str], label: int) -> dict:
    dataset = object.__new__(GLUEDataset)  # the dataset without its files: only what __getitem__ reads
    dataset.tokenizer, dataset.task_name, dataset.input_count, dataset.max_seq_len = tokenizer, task_name, count, 256
    dataset.datalist = [{"sentences": sentences[:count], "label": label}]
    dataset.target_set, dataset.task_info = [], {}
    item = dataset[0]
    sample = item["input_sample"][0]
    return {"sentences": sentences[:count], "label": label, "input_ids": [int(i) for i in sample["data"][0]],
            "spe_index": int(sample["sample_info"]["spe_index"])}


def main() -> None:
    tokenizer = ClipTokenizer()
    tasks = {}
    for name, (count, words) in TASKS.items():
        examples = [official_example(tokenizer, name, count, [first, second], index % len(words))
                    for index, (first, second) in enumerate(zip(FIRST, SECOND))]
        targets = [[int(i) for i in tokenizer.encode(word + " <|endoftext|>")] for word in words]
        tasks[name] = {"label_words": words, "label_word_ids": targets, "examples": examples}
    commit = subprocess.run(["git", "-C", UPREF, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = os.path.join(HERE, "..", "..", "tests", "fixtures", "official_glue_templates.json")
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"official_commit": commit, "stubs": STUBS_USED, "max_seq_len": 256,
                   "spe_token_id": int(tokenizer.encode("<|spe|>")[0]), "tasks": tasks}, handle, indent=1)
    print(f"wrote {os.path.normpath(out)}")


if __name__ == "__main__":
    main()
