"""Built-in tasks, JSONL input, partitioners and exact-match scoring."""

import pytest

from fedlora_edge.coordinator.partition import builtin_client_data, counts_from_mix, domain_mix, split_pool
from fedlora_edge.core.data import (
    TASKS,
    DataFormatError,
    Example,
    collate,
    encode_examples,
    exact_match,
    generate_task,
    is_eval_prompt,
    load_jsonl,
)


@pytest.mark.parametrize("task", list(TASKS))
def test_generators_are_deterministic_correct_and_split_disjoint(task):
    a = generate_task(task, 30, seed=7)
    assert a == generate_task(task, 30, seed=7)
    assert a != generate_task(task, 30, seed=8)
    ev = generate_task(task, 30, seed=7, split="eval")
    assert not {e.prompt for e in a} & {e.prompt for e in ev}
    assert all(is_eval_prompt(e.prompt) for e in ev) and not any(is_eval_prompt(e.prompt) for e in a)
    assert len({e.prompt for e in ev}) == 30
    assert all(e.domain == task for e in a + ev)


def test_answers_are_right():
    for ex in generate_task("add", 20, 0):
        a, b = ex.prompt.removeprefix("What is ").removesuffix("?").split(" + ")
        assert int(ex.response) == int(a) + int(b)
    for ex in generate_task("reverse", 20, 0):
        assert ex.response == ex.prompt.rsplit(" ", 1)[1][::-1]
    for ex in generate_task("parity", 20, 0):
        n = int(ex.prompt.split()[1])
        assert ex.response == ("even" if n % 2 == 0 else "odd")


def test_exact_match_normalisation():
    assert exact_match(" 81.\nmore text", "81")
    assert exact_match('"odd"', "odd")
    assert not exact_match("The answer is 81", "81")
    assert not exact_match("", "81")


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(DataFormatError, match=r"d.jsonl:3: field 'response'"):
        load_jsonl(p)
    p.write_text('{"prompt": "a", "response": "b", "domain": "x"}\nnot json\n')
    with pytest.raises(DataFormatError, match=r"d.jsonl:2: not valid JSON"):
        load_jsonl(p)
    p.write_text('[1, 2]\n')
    with pytest.raises(DataFormatError, match=r"d.jsonl:1: expected a JSON object"):
        load_jsonl(p)
    with pytest.raises(DataFormatError, match="no such file"):
        load_jsonl(tmp_path / "missing.jsonl")
    p.write_text('{"prompt": "p", "response": "r", "domain": "x"}\n')
    assert load_jsonl(p) == [Example("p", "r", "x")]


def test_by_domain_partition_follows_the_skew():
    mixes = domain_mix(4, ["a", "b", "c", "d"], "by_domain", skew=0.7, alpha=1.0, seed=0)
    assert [max(m, key=m.get) for m in mixes] == ["a", "b", "c", "d"]
    assert all(abs(sum(m.values()) - 1) < 1e-9 and abs(max(m.values()) - 0.7) < 1e-9 for m in mixes)
    data = builtin_client_data(domain_mix(2, ["add", "upper"], "by_domain", skew=1.0, alpha=1, seed=0), 10, 0)
    assert {e.domain for e in data[0]} == {"add"} and {e.domain for e in data[1]} == {"upper"}


def test_dirichlet_and_iid_partitions():
    d1 = domain_mix(5, ["a", "b", "c"], "dirichlet", skew=0, alpha=0.1, seed=1)
    assert d1 == domain_mix(5, ["a", "b", "c"], "dirichlet", skew=0, alpha=0.1, seed=1)
    assert all(abs(sum(m.values()) - 1) < 1e-9 for m in d1)
    # small alpha concentrates each client on few domains
    assert sum(max(m.values()) for m in d1) / 5 > 0.6
    assert domain_mix(3, ["a", "b"], "iid", skew=0, alpha=1, seed=0) == [{"a": 0.5, "b": 0.5}] * 3


def test_counts_from_mix_sum_exactly():
    assert sum(counts_from_mix({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10).values()) == 10


def test_split_pool_deals_user_data_by_domain():
    pool = [Example(f"p{i}", "r", "x" if i % 2 else "y") for i in range(20)]
    parts = split_pool(pool, [{"x": 1.0, "y": 0.0}, {"x": 0.0, "y": 1.0}], 5, seed=0)
    assert {e.domain for e in parts[0]} == {"x"} and {e.domain for e in parts[1]} == {"y"}
    assert len({e.prompt for e in parts[0]}) == 5


def test_encoding_puts_loss_on_the_response_only(tiny):
    _, tok = tiny
    enc = encode_examples(tok, [Example("What is 1 + 2?", "3")], 64)
    batch = collate(enc, tok.pad_token_id)
    labels = batch["labels"][0]
    kept = labels[labels != -100].tolist()
    assert tok.decode(kept) == "3" + tok.eos_token
    # the prompt goes through the chat template
    assert "<|im_start|>assistant" in tok.decode(batch["input_ids"][0])
