"""The extractive-QA type: SQuAD's answers checked against their contexts, long contexts split
into windows with a stride and answers mapped to tokens, windows' scores mapped back to text
(across windows, with "no answer" for SQuAD 2.0), and SQuAD's exact match and F1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tasks.types.conftest import make_spec, rows
from trainer.tasks import TaskError
from trainer.tasks.types import TASK_TYPES
from trainer.tasks.types.extractive_qa import POSTPROCESS_COLUMNS, answers_of

TYPE = TASK_TYPES["extractive_qa"]
CONTEXT = "the cat is near the park . the dog is near the farm . the bird is near the beach ."


def spec(**declaration):
    return make_spec("extractive_qa", **declaration)


def answer(text: str, context: str = CONTEXT, nth: int = 0) -> dict:
    start = -1
    for _ in range(nth + 1):
        start = context.index(text, start + 1)
    return {"text": text, "answer_start": start}


def test_answers_are_read_in_squads_layout_and_the_hubs():
    assert answers_of([{"text": "farm", "answer_start": 47}]) == ([("farm", 47)], None)
    assert answers_of({"text": ["farm", "the farm"], "answer_start": [47, 43]}) == ([("farm", 47), ("the farm", 43)], None)
    assert answers_of([]) == ([], None)
    assert "not a list of answers" in answers_of("farm")[1]
    assert "2 answer texts but 1 answer_start" in answers_of({"text": ["a", "b"], "answer_start": [1]})[1]


@pytest.mark.parametrize(("answers", "problem"), [
    ([{"text": "farm"}], "answer 1 in column 'answers' (role 'answers') has no answer_start offset"),
    ([{"text": "farm", "answer_start": None}], "has no answer_start offset"),
    ([{"text": "farm", "answer_start": 3}], "answer 1 in column 'answers' (role 'answers'), 'farm', is not at offset 3 of the context"),
    ([{"text": "", "answer_start": 3}], "answer 1 in column 'answers' (role 'answers') has no text"),
    ([], "no answer in column 'answers' (role 'answers'); give the row its answer, or declare 'unanswerable: true'"),
])
def test_a_row_whose_answers_cannot_train_is_named(answers, problem):
    data = rows(question=["q", "q"], context=[CONTEXT, CONTEXT], answers=[[answer("farm")], answers])
    found = TYPE.first_label_problem(spec(), data)
    assert found is not None and found[0] == 1 and problem in found[1], found


def test_answers_that_are_not_a_list_are_named():
    data = rows(question=["q"], context=[CONTEXT], answers=["farm"])
    assert TYPE.first_label_problem(spec(), data) == (0, "column 'answers' (role 'answers') holds a str, not a list of "
                                                         "answers [{text, answer_start}, …]")


def test_questions_without_an_answer_are_allowed_when_declared_unanswerable():
    data = rows(question=["q"], context=[CONTEXT], answers=[[]])
    assert TYPE.first_label_problem(spec(unanswerable=True), data) is None


def test_the_options_are_refused_on_other_types_and_checked():
    for key, value in (("unanswerable", True), ("stride", 16), ("max_answer_length", 8)):
        with pytest.raises(TaskError, match=f"'{key}' applies to type extractive_qa, not to type classification; remove it"):
            make_spec("classification", **{key: value})
    with pytest.raises(TaskError, match="stride must be a positive integer, got 0"):
        spec(stride=0)
    with pytest.raises(TaskError, match="unanswerable must be true or false, got 'yes'"):
        spec(unanswerable="yes")
    with pytest.raises(TaskError, match="takes its answers from the 'answers' column"):
        spec(labels=["a", "b"])
    with pytest.raises(TaskError, match="metric\\(s\\) accuracy do not apply to type extractive_qa"):
        spec(metrics=["accuracy"])
    assert spec().metrics == ("f1", "exact_match") and spec(unanswerable=True).unanswerable is True


def encode(tokenizer, data, max_length: int, **declaration):
    return TYPE.encode(spec(**declaration), data[:], tokenizer, max_length, with_labels=True)


def test_a_long_context_becomes_windows_sharing_the_stride_and_labels_the_answer_where_a_window_holds_it(tokenizer):
    data = rows(question=["which place is the dog near ?"], context=[CONTEXT], answers=[[answer("farm")]])
    whole = encode(tokenizer, data, 64)
    assert whole["window"] == [0] and whole["labels"] != [[0, 0]]
    out = encode(tokenizer, data, 20, stride=4)
    n = len(out["input_ids"])
    assert n > 2 and out["window"] == list(range(n))
    assert all(len(ids) <= 20 for ids in out["input_ids"])
    holding = 0
    for i in range(n):
        first, last = out["labels"][i]
        offsets = out["context_offsets"][i]
        if (first, last) == (0, 0):
            continue
        holding += 1
        assert CONTEXT[offsets[first][0]:offsets[last][1]] == "farm"
    assert holding >= 1  # the answer is in at least one window; the others point at the no-answer position
    # Consecutive windows share `stride` context tokens.
    first_window = [o for o in out["context_offsets"][0] if o is not None]
    second_window = [o for o in out["context_offsets"][1] if o is not None]
    assert first_window[-4:] == second_window[:4]
    assert set(POSTPROCESS_COLUMNS) <= set(out) and out["context"] == [CONTEXT] * n and out["answer_texts"] == [["farm"]] * n


def test_the_collator_gives_the_model_its_inputs_and_the_head_its_start_and_end(tokenizer):
    import datasets

    data = rows(question=["which place is the dog near ?", "which place is the cat near ?"], context=[CONTEXT] * 2,
                answers=[[answer("farm")], [answer("park")]])
    encoded = datasets.Dataset.from_dict(encode(tokenizer, data, 64))
    batch = TYPE.collator(tokenizer)([encoded[0], encoded[1]])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    inputs = TYPE.head_inputs(dict(batch))
    assert "labels" not in inputs and torch.equal(inputs["start_positions"], batch["labels"][:, 0])
    assert torch.equal(inputs["end_positions"], batch["labels"][:, 1])


def windows_of(tokenizer, question: str, max_length: int = 20, **declaration):
    import datasets

    data = rows(question=[question], context=[CONTEXT], answers=[[answer("farm")]])
    return datasets.Dataset.from_dict(encode(tokenizer, data, max_length, stride=4, **declaration))


def logits_for(windows, spans: dict[int, tuple[int, int, float]], width: int):
    """Start and end logits: 0 everywhere, `value` at (start, end) of the windows in `spans`;
    padded with -100 to `width` as the evaluation loop pads."""
    start = np.full((len(windows), width), -100.0)
    end = np.full((len(windows), width), -100.0)
    for i, ids in enumerate(windows["input_ids"]):
        start[i, : len(ids)] = 0.0
        end[i, : len(ids)] = 0.0
    for i, (s, e, value) in spans.items():
        start[i, s] += value
        end[i, e] += value
    return start, end


def token_of(windows, i: int, word: str, nth: int = 0) -> int:
    at = answer(word, nth=nth)["answer_start"]
    return next(k for k, o in enumerate(windows["context_offsets"][i]) if o is not None and o[0] == at)


def test_the_best_span_over_all_windows_is_the_answer_with_its_offsets(tokenizer):
    windows = windows_of(tokenizer, "which place is the dog near ?")
    farm = next(i for i in range(len(windows)) if any(o and CONTEXT[o[0]:o[1]] == "farm" for o in windows["context_offsets"][i]))
    other = (farm + 1) % len(windows)
    beach_window = len(windows) - 1
    s = token_of(windows, farm, "farm")
    b = token_of(windows, beach_window, "beach")
    predictions = logits_for(windows, {farm: (s, s, 8.0), beach_window: (b, b, 5.0), other: (0, 0, 3.0)}, 24)
    [found] = TYPE.answers(spec(), predictions, windows)
    start = answer("farm")["answer_start"]
    assert found["answer"] == "farm" and (found["start"], found["end"]) == (start, start + 4)
    assert 0.5 < found["score"] <= 1.0
    assert TYPE.score_split(spec(), predictions, None, windows, tokenizer) == {"f1": 1.0, "exact_match": 1.0}
    # A span longer than max_answer_length is never the answer.
    long_windows = windows_of(tokenizer, "which place is the dog near ?", max_answer_length=1)
    first = token_of(long_windows, farm, "the", nth=3)  # "the farm": two tokens
    spans = {farm: (first, s, 9.0)}
    [short] = TYPE.answers(spec(max_answer_length=1), logits_for(long_windows, spans, 24), long_windows)
    assert short["answer"] != "the farm"


def test_no_answer_wins_only_when_the_task_is_unanswerable_and_it_is_likelier(tokenizer):
    windows = windows_of(tokenizer, "which place is the fish near ?", unanswerable=True)
    every = {i: (0, 0, 9.0) for i in range(len(windows))}  # every window says "no answer"
    predictions = logits_for(windows, every, 24)
    [found] = TYPE.answers(spec(unanswerable=True), predictions, windows)
    assert found == {"answer": "", "score": found["score"], "start": 0, "end": 0} and found["score"] > 0.5
    [forced] = TYPE.answers(spec(), predictions, windows)  # SQuAD v1: always a span
    assert forced["answer"] != ""
    # One window that is sure of an answer: the least "no answer" probability is the one compared.
    s = token_of(windows, 0, "cat")
    mixed = logits_for(windows, {**every, 0: (s, s, 9.0)}, 24)
    assert TYPE.answers(spec(unanswerable=True), mixed, windows)[0]["answer"] == "cat"


def test_chance_is_the_better_of_no_answer_and_the_most_frequent_answer(tokenizer):
    import datasets

    data = rows(question=["q1", "q2", "q3"], context=[CONTEXT] * 3,
                answers=[[answer("farm")], [answer("farm")], [answer("park")]])
    windows = datasets.Dataset.from_dict(encode(tokenizer, data, 64))
    assert TYPE.split_chance(spec(), windows, tokenizer) == {"f1": pytest.approx(2 / 3), "exact_match": pytest.approx(2 / 3)}


def test_predict_inputs_get_empty_answers_and_a_row_of_output_each(tokenizer):
    import datasets

    inputs = datasets.Dataset.from_dict({"question": ["which place is the dog near ?"], "context": [CONTEXT]})
    placed = TYPE.placeholder_labels(spec(), inputs)
    encoded = datasets.Dataset.from_dict(TYPE.encode(spec(), placed[:], tokenizer, 20, with_labels=True))
    predictions = logits_for(encoded, {}, 24)
    rows_out = TYPE.split_prediction_rows(spec(), predictions, None, encoded, tokenizer)
    assert len(rows_out) == 1 and set(rows_out[0]) == {"answer", "score", "start", "end"}
