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
