"""tools/evaluate.py's test inputs, shared by tests/test_evaluate.py and the session fixture in
conftest.py that writes them once (the TP/PP cases of test_evaluate read them in the grouped
two-process launch): a tiny random checkpoint and lm-eval tasks over local jsonl files."""

import json
import os

from tests.helpers import tiny_model_flags, write_random_checkpoint

NUM_LAYERS, EXITS, MAX_SEQ, VOCAB = 4, [1, 2], 64, 64
MC_TASK, GEN_TASK, ROLLING_TASK = "tiny_choice", "tiny_continue", "tiny_rolling"
CONTEXTS = ["5 17 3", "40 2 33 13 8", "11 12 13 14", "7 7 7", "60 1 59 2", "9 18 27", "30 31", "44 3 44 3 44"]
CHOICES = ["9", "40 2", "12", "3 3 3"]


def write_checkpoint(root: str) -> None:
    write_random_checkpoint(root, tiny_model_flags(NUM_LAYERS, MAX_SEQ, VOCAB, EXITS, seed=7, divisible_by=128), 128)


def write_tasks(folder: str, gen_answers) -> None:
    """A multiple-choice task and a generation task over local jsonl files."""
    mc = os.path.join(folder, "choice.jsonl")
    with open(mc, "w") as f:
        for i, context in enumerate(CONTEXTS):
            f.write(json.dumps({"context": context, "choices": CHOICES, "label": i % len(CHOICES)}) + "\n")
    gen = os.path.join(folder, "continue.jsonl")
    with open(gen, "w") as f:
        for context, answer in zip(CONTEXTS, gen_answers):
            f.write(json.dumps({"context": context, "answer": answer}) + "\n")
    common = 'output_type: {}\ntest_split: train\ndoc_to_text: "{{{{context}}}}"\n'
    with open(os.path.join(folder, f"{ROLLING_TASK}.yaml"), "w") as f:  # perplexity of the contexts
        f.write(
            f"task: {ROLLING_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {mc}\n"
            'output_type: loglikelihood_rolling\ntest_split: train\ndoc_to_text: ""\n'
            'doc_to_target: "{{context}}"\nmetric_list:\n  - metric: word_perplexity\n'
            "metadata:\n  version: 1.0\n"
        )
    with open(os.path.join(folder, f"{MC_TASK}.yaml"), "w") as f:
        f.write(
            f"task: {MC_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {mc}\n"
            + common.format("multiple_choice")
            + 'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 1.0\n"
        )
    with open(os.path.join(folder, f"{GEN_TASK}.yaml"), "w") as f:
        f.write(
            f"task: {GEN_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {gen}\n"
            + common.format("generate_until")
            + 'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["99"]\n  max_gen_toks: 3\n'
            "  do_sample: false\n  temperature: 0.0\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 1.0\n"
        )


def write_inputs(root: str) -> dict:
    """The checkpoint and the task folder under `root`. Every other generation answer is the
    model's own full-depth greedy continuation (3 tokens, as the text it adds after the
    context: a space, then the ids), so that exact match is 0.5 at full depth."""
    from megatron.early_exit.inference import FullDepth, generate
    from megatron.early_exit.inference.loading import load_model

    checkpoint, tasks = os.path.join(root, "ckpt"), os.path.join(root, "tasks")
    os.makedirs(tasks)
    write_checkpoint(checkpoint)
    model, tokenizer, _ = load_model(checkpoint)
    result = generate(model, [tokenizer.tokenize(c) for c in CONTEXTS], FullDepth(), max_new_tokens=3)
    greedy = [" " + tokenizer.detokenize(t) for t in result.tokens]
    write_tasks(tasks, [t if i % 2 == 0 else "1 1 1" for i, t in enumerate(greedy)])
    return {"checkpoint": checkpoint, "task_dir": tasks}
