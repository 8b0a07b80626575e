"""Tasks: problems, wording and grading of world, gsm8k, math500 and any jsonl."""
import json

import pytest
from hf_tiny import GSM8K_TOY, write_gsm8k_toy
from realdata import data_file

from swiftjax.config import build
from swiftjax.tasks import TaskConfig, make_task
from swiftjax.world import problems as world


def test_world_task_is_the_world_splits():
    t = make_task(TaskConfig(name="world", n_train=5, n_test=3, seed=0))
    ref = world.make_split("test", 3, seed=0)
    assert [p.id for p in t.problems("test")] == [p.id for p in ref]
    assert t.user_message(t.problems("test")[0]) == ref[0].question
    assert t.grade(ref[0].solution, t.problems("test")[0].gold) == (str(ref[0].answer), True)
    assert t.grade("Answer: -1", t.problems("test")[0].gold)[1] is False
    # a chat model's boxed answer counts when there is no "Answer:" line (grader world 2)
    gold = t.problems("test")[0].gold
    assert t.grade(f"so the total is \\(\\boxed{{{gold}}}\\) years.", gold) == (gold, True)
    assert t.grade(f"\\boxed{{{int(gold) + 1}}}", gold) == (str(int(gold) + 1), False)
    assert t.grade(f"Answer: {gold}\n\\boxed{{{int(gold) + 1}}}", gold) == (gold, True)  # Answer: first
    assert t.grade("\\boxed{2.5}", gold) == (None, False) and t.grade("\\boxed{", gold) == (None, False)
    assert t.describe()["grader"] == "world" and t.describe()["grader_version"] == 2


def test_gsm8k_task_two_files_and_wording(tmp_path):
    tr = write_gsm8k_toy(tmp_path / "train.jsonl")
    te = write_gsm8k_toy(tmp_path / "test.jsonl", GSM8K_TOY[:2])
    t = make_task(TaskConfig(name="gsm8k", train_path=str(tr), test_path=str(te), n_train=4, n_test=2))
    assert [p.gold for p in t.problems("test")] == ["7", "12"]
    assert len(t.problems("train")) == 4
    msg = t.user_message(t.problems("test")[0])
    assert msg.startswith(GSM8K_TOY[0][0]) and "####" in msg
    assert t.grade("so 3 + 4 = 7\n#### 7", "7") == ("7", True)
    assert t.grade("#### 8", "7") == ("8", False)
    assert t.grade("no number", "7") == (None, False)


def test_one_file_splits_never_overlap(tmp_path):
    f = write_gsm8k_toy(tmp_path / "all.jsonl")
    t = make_task(TaskConfig(name="gsm8k", test_path=str(f), n_train=None, n_test=2))
    test_ids = {p.id for p in t.problems("test")}
    train_ids = {p.id for p in t.problems("train")}
    assert len(test_ids) == 2 and len(train_ids) == 4 and not test_ids & train_ids
    with pytest.raises(ValueError, match="task.n_train: expected 10 problems"):
        make_task(TaskConfig(name="gsm8k", test_path=str(f), n_train=10, n_test=2)).problems("train")


def test_generic_jsonl_task_fields_and_grader(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps({"q": f"say {i}", "gold": str(i), "uid": f"p{i}"}) for i in range(3)))
    t = make_task({"name": "jsonl", "test_path": str(f), "question_field": "q", "answer_field": "gold",
                   "id_field": "uid", "grader": "exact", "n_test": 3, "prompt": "Task: {question} \\boxed{}"})
    p = t.problems("test")[1]
    assert (p.id, p.gold) == ("p1", "1")
    assert t.user_message(p) == "Task: say 1 \\boxed{}"
    assert t.grade("thinking\n1", "1") == ("1", True)


def test_bad_task_files_name_file_line_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a field 'answer'"):
        make_task(TaskConfig(name="gsm8k", test_path=str(f), n_test=1)).problems("test")
    f.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer': expected a GSM8K solution"):
        make_task(TaskConfig(name="gsm8k", test_path=str(f), n_test=1)).problems("test")
    f.write_bytes(b'{"question": "\xff", "answer": "#### 1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected UTF-8"):
        make_task(TaskConfig(name="gsm8k", test_path=str(f), n_test=1)).problems("test")
    with pytest.raises(ValueError, match="task.test_path: expected a jsonl file"):
        make_task(TaskConfig(name="gsm8k", test_path=str(tmp_path), n_test=1)).problems("test")
    with pytest.raises(ValueError, match="prompt: expected a string containing '{question}'"):
        build(TaskConfig, {"prompt": "no placeholder"}, "task")
    with pytest.raises(ValueError, match="task.name: expected one of"):
        build(TaskConfig, {"name": "gsm9k"}, "task")


def test_real_gsm8k_and_math500_files():
    g = make_task(TaskConfig(name="gsm8k", train_path=str(data_file("gsm8k_train.jsonl")),
                             test_path=str(data_file("gsm8k_test.jsonl")), n_train=3, n_test=3))
    assert g.problems("test")[0].gold == "18"
    m = make_task(TaskConfig(name="math500", test_path=str(data_file("math500_test.jsonl")), n_train=2, n_test=3))
    p = m.problems("test")[0]
    assert "\\boxed{}" in m.user_message(p)
    assert m.grade(f"so the answer is \\boxed{{{p.gold}}}", p.gold)[1]
    assert not {q.id for q in m.problems("train")} & {q.id for q in m.problems("test")}
