import pytest

from opdgeo.task import answer_length, is_held_out, make_example, score, split_examples


def test_answer_is_the_sum_with_digits_reversed():
    example = make_example(123, 45, digits=3)
    assert example.prompt == "123+045="
    assert example.answer == str(123 + 45).zfill(4)[::-1]
    assert len(example.answer) == answer_length(3)


def test_splits_are_disjoint_and_seeded():
    train = split_examples(2, 500, "train", seed=0)
    held_out = split_examples(2, 200, "eval", seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert split_examples(2, 50, "train", seed=3) == split_examples(2, 50, "train", seed=3)
    assert split_examples(2, 50, "train", seed=3) != split_examples(2, 50, "train", seed=4)


def test_held_out_answers_look_like_training_answers():
    # A linear hash put every held-out sum ending in 0 (answers starting with "0"), a set
    # no training answer resembled: held-out scores then measured something else.
    def first_digits(split):
        return {e.answer[0] for e in split_examples(2, 500, split, seed=0)}

    assert first_digits("eval") == first_digits("train") == set("0123456789")
    held_out = sum(is_held_out(a, b) for a in range(100) for b in range(100))
    assert 800 < held_out < 1200


def test_every_answer_is_correct_arithmetic():
    for example in split_examples(3, 100, "train", seed=1):
        a, b = (int(x) for x in example.prompt.rstrip("=").split("+"))
        assert int(example.answer[::-1]) == a + b


def test_exact_match_scoring():
    assert score("0861", "0861") == 1.0
    assert score(" 0861 ", "0861") == 1.0
    assert score("0862", "0861") == 0.0
    assert score("08610", "0861") == 0.0


def test_held_out_prompts_are_distinct_and_bounded():
    held_out = {(a, b) for a in range(100) for b in range(100) if is_held_out(a, b)}
    prompts = [e.prompt for e in split_examples(2, len(held_out), "eval", seed=0)]
    assert len(set(prompts)) == len(held_out)  # every held-out pair, each once
    with pytest.raises(ValueError, match=f"holds out {len(held_out)}"):
        split_examples(2, len(held_out) + 1, "eval", seed=0)


def test_privileged_contexts_are_the_example_s_own_or_another_s():
    from dataclasses import replace

    from opdgeo.task import privileged_contexts

    # training prompts repeat; each prompt's own solution names it, so a context's donor is known
    examples = [replace(e, context=f"solution of {e.prompt}")
                for e in split_examples(2, 300, "train", 0)]
    assert len({e.prompt for e in examples}) < len(examples)
    assert privileged_contexts(examples, "own", 0) == [e.context for e in examples]
    other = privileged_contexts(examples, "other", 0)
    donors = [context.removeprefix("solution of ") for context in other]
    prompts = {e.prompt for e in examples}
    assert all(d != e.prompt and d in prompts for d, e in zip(donors, examples, strict=True))
    given = {}
    for e, donor in zip(examples, donors, strict=True):
        assert given.setdefault(e.prompt, donor) == donor  # a repeated prompt: the same donor
    assert len(set(given.values())) == len(given)  # a permutation: every context given once
    assert other == privileged_contexts(examples, "other", 0)  # fixed by the seed
    assert other != privileged_contexts(examples, "other", 1)


def test_privileged_prompt_and_missing_context():
    from dataclasses import replace

    from opdgeo.task import AdditionTask, privileged_contexts

    example = make_example(123, 45, 3)
    assert AdditionTask.privileged_prompt(example.prompt, example.context) == "8610=123+045="
    with pytest.raises(ValueError, match="data set row 7 .*no privileged context.*solution"):
        privileged_contexts([example, replace(example, context="", row=7)], "own", 0)
