"""The math task's loaders on tiny local files written in the real data sets' schemas, read
through the same code as the hub ids; math-verify scoring; chat prompts end to end."""

import json
import string

import pandas as pd
import pytest

from opdgeo.config import RunSpec, pair_training
from opdgeo.data import load_examples, score
from opdgeo.evaluate import evaluate_checkpoints
from opdgeo.models import character_tokenizer, load_tokenizer
from opdgeo.prompts import render_prompts
from opdgeo.task import make_task
from opdgeo.train import train_run

DAPO_INSTRUCTION = ("Solve the following math problem step by step. The last line of your "
                    "response should be of the form Answer: $Answer (without quotes) where "
                    "$Answer is the answer to the problem.\n\n{}\n\nRemember to put your answer "
                    "on its own line after \"Answer:\".")


def dapo_row(i, problem, answer):
    """A row of BytedTsinghua-SIA/DAPO-Math-17k as the hub serves it."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_INSTRUCTION.format(problem), "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lm"},
        "extra_info": {"index": f"uuid-{i}"},
    }


def aime_row(i, problem, answer, year):
    """A row of HuggingFaceH4/aime_2024 / yentinglin/aime_2025."""
    return {"id": i, "problem": problem, "solution": "...", "answer": answer,
            "url": f"https://artofproblemsolving.com/{i}", "year": year}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    problems = [(f"What is {a}+{a}?", str(2 * a)) for a in range(1, 6)]
    # The hub copy repeats every prompt (100 times); three times is enough to see it dropped.
    rows = [dapo_row(i, p, a) for _ in range(3) for i, (p, a) in enumerate(problems)]
    pd.DataFrame(rows).to_parquet(root / "dapo.parquet")
    # AIME24 as a hub-style folder (data/<split>-*.parquet), AIME25 as a JSON lines file.
    (root / "aime24" / "data").mkdir(parents=True)
    pd.DataFrame([aime_row(60, "Find 11+11.", "22", 2024), aime_row(61, "Find 3*4.", "12", 2024)]
                 ).to_parquet(root / "aime24" / "data" / "train-00000-of-00001.parquet")
    with (root / "aime25.jsonl").open("w") as f:
        f.write(json.dumps(aime_row(0, "Find 2^5.", "32", 2025)) + "\n")
    return root


def math_task_config(root, max_new_tokens=8):
    return {
        "kind": "math", "seed": 0, "max_new_tokens": max_new_tokens,
        "train": {"path": str(root / "dapo.parquet"), "prompt": "prompt",
                  "answer": "reward_model.ground_truth"},
        "eval": {
            "aime24": {"path": str(root / "aime24"), "split": "train", "prompt": "problem",
                       "answer": "answer", "template": "Q: {problem}"},
            "aime25": {"path": str(root / "aime25.jsonl"), "prompt": "problem",
                       "answer": "answer", "template": "Q: {problem}"},
        },
    }


def test_dapo_prompts_are_chat_messages_without_repeats(files):
    task = make_task(math_task_config(files))
    examples = task.train_examples(100, seed=0)
    assert len(examples) == 5  # all distinct prompts when fewer than asked for
    assert examples[0].prompt[0]["role"] == "user"
    assert "Remember to put your answer" in examples[0].prompt[0]["content"]
    assert sorted(e.answer for e in examples) == ["10", "2", "4", "6", "8"]
    assert task.train_examples(3, seed=0) == examples[:3]  # seeded order, then the first n
    assert task.train_examples(5, seed=1) != examples


def test_aime_benchmarks_load_with_their_template(files):
    examples = make_task(math_task_config(files)).eval_examples()
    assert [e.answer for e in examples] == ["22", "12", "32"]  # AIME24 then AIME25
    assert examples[0].prompt == [{"role": "user", "content": "Q: Find 11+11."}]


def test_missing_column_names_the_columns(files):
    with pytest.raises(ValueError, match="no column 'question'"):
        load_examples({"path": str(files / "aime25.jsonl"), "prompt": "question"})


@pytest.mark.parametrize("completion,answer,expected", [
    ("2+2 is 4, so\nAnswer: 4", "4", 1.0),
    ("The sum is \\boxed{204}.", "204", 1.0),
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("Answer: 5", "4", 0.0),
    ("", "4", 0.0),
])
def test_math_verify_scores(completion, answer, expected):
    assert score(completion, answer) == expected


def chat_tokenizer():
    tokenizer = character_tokenizer(string.printable)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}A:{% endif %}")
    return tokenizer


def test_prompts_go_through_the_chat_template_when_there_is_one():
    messages = [[{"role": "user", "content": "Q: 1+1?"}]]
    assert render_prompts(chat_tokenizer(), messages) == (["Q: 1+1?\nA:"], False)
    plain = character_tokenizer(string.printable)
    assert render_prompts(plain, messages) == (["Q: 1+1?"], True)
    assert render_prompts(plain, ["12+34="]) == (["12+34="], True)


@pytest.mark.train
def test_one_opd_step_and_evaluation_on_the_math_task(files, tmp_path, make_checkpoint):
    """TRL's conversational path (chat template) for training, the same for mean@k."""
    tokenizer = chat_tokenizer()
    student = make_checkpoint(tmp_path / "student", seed=0, tokenizer=tokenizer)
    teacher = make_checkpoint(tmp_path / "teacher", seed=1, hidden=32, tokenizer=tokenizer)
    assert load_tokenizer(student).chat_template == tokenizer.chat_template
    config = {"training": {"steps": 1, "batch_size": 4, "save_every": 1, "prompts": 5,
                           "generations_per_prompt": 2,
                           "optimizers": {"adamw": {"learning_rate": 1e-3}}},
              "pairs": {"m": {"student": "s", "teachers": ["t"]}}}
    spec = RunSpec("m-opd-t-adamw-s0", "opd", "m", "s", "t", "adamw", 0,
                   training=pair_training(config, "m"))
    task = math_task_config(files)
    train_run(spec, student, teacher, task, tmp_path / "run", "cpu")
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    table = evaluate_checkpoints({1: tmp_path / "run" / "final"}, spec.name, make_task(task),
                                 k=2, temperature=1.0, seed=0, device="cpu")
    assert set(table["metric"]) == {"exact_match", "mean@2"}
    assert table["value"].between(0, 1).all()
    assert ((table["low"] <= table["value"]) & (table["value"] <= table["high"])).all()


# ---------------------------------------------------------------- Geo3K (vision-language)


def png(size, colour) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def geo3k_rows(bad_row=None):
    """Rows of hiyouga/geometry3k: `images` (a list of one figure), `problem` with an
    `<image>` placeholder, `answer`."""
    rows = [{"images": [{"bytes": png((60 + 10 * i, 40), (20 * i, 90, 200)), "path": None}],
             "problem": f"<image>Find x if 2x = {2 * (i + 3)}.", "answer": str(i + 3)}
            for i in range(4)]
    if bad_row is not None:
        rows[bad_row]["images"] = [{"bytes": b"this is not an image", "path": None}]
    return rows


def geo3k_spec(path):
    return {"path": str(path), "prompt": "problem", "answer": "answer", "image": "images",
            "template": "{problem} Put the final answer in \\boxed{{}}."}


def write_hub_style(rows, path):
    """As the hub serves it: a parquet file whose `images` column is a list of Image."""
    import datasets

    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


@pytest.mark.parametrize("hub_style", [False, True])
def test_geo3k_rows_load_with_their_images(tmp_path, hub_style):
    path = tmp_path / "geo3k.parquet"
    if hub_style:
        write_hub_style(geo3k_rows(), path)
    else:
        pd.DataFrame(geo3k_rows()).to_parquet(path)
    examples = load_examples(geo3k_spec(path))
    assert len(examples) == 4
    first = examples[0]
    assert first.prompt == [{"role": "user",
                             "content": "Find x if 2x = 6. Put the final answer in \\boxed{}."}]
    assert first.image.mode == "RGB" and first.image.size == (60, 40)
    assert first.image.getpixel((0, 0)) == (0, 90, 200)
    assert first.answer == "3"
    assert score("so x = \\boxed{3}", first.answer) == 1.0
    assert score("\\boxed{4}", first.answer) == 0.0


@pytest.mark.parametrize("hub_style", [False, True])
def test_undecodable_image_stops_with_the_row_named(tmp_path, hub_style):
    path = tmp_path / "geo3k.parquet"
    if hub_style:
        write_hub_style(geo3k_rows(bad_row=2), path)
    else:
        pd.DataFrame(geo3k_rows(bad_row=2)).to_parquet(path)
    with pytest.raises(ValueError, match=r"row 2: cannot decode the image"):
        load_examples(geo3k_spec(path))


@pytest.mark.train
def test_geo3k_task_trains_and_evaluates_a_vl_pair(tmp_path, make_checkpoint):
    """One OPD step with Geo3K figures of any size, then greedy and sampled evaluation."""
    path = tmp_path / "geo3k.parquet"
    pd.DataFrame(geo3k_rows()).to_parquet(path)
    student = make_checkpoint(tmp_path / "student", seed=0, arch="qwen2_vl")
    teacher = make_checkpoint(tmp_path / "teacher", seed=1, hidden=32, arch="qwen2_vl")
    task = {"kind": "math", "seed": 0, "max_new_tokens": 4, "train": geo3k_spec(path),
            "eval": {"geo3k": geo3k_spec(path)}}
    assert make_task(task).train_examples(2, seed=0)[0].image is not None
    config = {"training": {"steps": 1, "batch_size": 2, "save_every": 1, "prompts": 4,
                           "generations_per_prompt": 1, "loss": "forward_kl_topk", "topk": 4,
                           "optimizers": {"adamw": {"learning_rate": 1e-3}}},
              "pairs": {"g": {"student": "s", "teachers": ["t"]}}}
    spec = RunSpec("g-opd-t-adamw-s0", "opd", "g", "s", "t", "adamw", 0,
                   training=pair_training(config, "g"))
    train_run(spec, student, teacher, task, tmp_path / "run", "cpu")
    table = evaluate_checkpoints({1: tmp_path / "run" / "final"}, spec.name, make_task(task),
                                 k=2, temperature=1.0, seed=0, device="cpu")
    assert set(table["metric"]) == {"exact_match", "mean@2"}


# ---------------------------------------------------------------- self-distillation data


def openthoughts_file(path, solutions):
    """siyanzhao/Openthoughts_math_30k_opsd's schema: problem, solution, Answer."""
    rows = [{"problem": f"What is {i}+{i}?", "solution": solution, "Answer": str(2 * i),
             "generated_token_count": len(solution)} for i, solution in enumerate(solutions, 1)]
    pd.DataFrame(rows).to_parquet(path)
    return {"path": str(path), "prompt": "problem", "answer": "Answer", "solution": "solution",
            "template": "Q: {problem}", "privileged_template": "{prompt} S: {context}"}


def test_solutions_load_as_privileged_contexts_and_bad_ones_name_the_row(tmp_path):
    spec = openthoughts_file(tmp_path / "ot.parquet", ["1+1=2", "2+2=4", "3+3=6"])
    examples = load_examples(spec)
    assert [(e.context, e.row) for e in examples] == [("1+1=2", 0), ("2+2=4", 1), ("3+3=6", 2)]
    task = make_task({"kind": "math", "train": spec, "eval": {"x": spec}})
    assert task.privileged_prompt(examples[0].prompt, "c") == [
        {"role": "user", "content": "Q: What is 1+1? S: c"}]
    with pytest.raises(ValueError, match="no column 'reference' \\(its `solution`\\)"):
        load_examples({**spec, "solution": "reference"})
    empty = openthoughts_file(tmp_path / "empty.parquet", ["1+1=2", "  ", "3+3=6"])
    with pytest.raises(ValueError, match="row 1: the solution column 'solution' is empty.*"
                                         "drop the row"):
        load_examples(empty)


@pytest.mark.train
def test_self_distillation_on_math_trains_and_checks_the_context_length(tmp_path,
                                                                          make_checkpoint):
    """The chat-message path of the teacher's prompt; a solution that makes the teacher's
    prompt longer than the model's context stops the run before training, naming its row."""
    student = make_checkpoint(tmp_path / "student", seed=0, tokenizer=chat_tokenizer())
    config = {"training": {"steps": 1, "batch_size": 4, "save_every": 1, "prompts": 3,
                           "generations_per_prompt": 2, "loss": "jsd", "kl_clip": 0.05,
                           "optimizers": {"adamw": {"learning_rate": 1e-3}}},
              "pairs": {"m": {"student": "s", "teachers": [], "controls": ["opsd"]}}}
    spec = RunSpec("m-opsd-adamw-s0", "opsd", "m", "s", None, "adamw", 0,
                   training=pair_training(config, "m"))

    def task(solutions):
        train = openthoughts_file(tmp_path / f"{len(''.join(solutions))}.parquet", solutions)
        return {"kind": "math", "max_new_tokens": 8, "train": train, "eval": {"x": train}}

    train_run(spec, student, None, task(["2", "4", "6"]), tmp_path / "run", "cpu")
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="data set row 1: .*over the model's context of 64: "
                                         "drop the row"):
        train_run(spec, student, None, task(["2", "4" * 60, "6"]), tmp_path / "bad", "cpu")
    assert not (tmp_path / "bad" / "final").exists()
