"""Users' own data: the row forms, column mapping, per-device files and columns, Hugging Face
datasets, a pool dealt without reuse, the held-out split, the system prompt, and evaluation that
fits free text (held-out loss, the leading metric)."""

from __future__ import annotations

import json
import math

import pytest

from fedlora_edge.coordinator.config import ConfigError, load_config
from fedlora_edge.coordinator.partition import build_data, split_pool
from fedlora_edge.core.data import (
    SYSTEM_PROMPT,
    DataFormatError,
    Example,
    chat_prompt,
    load_jsonl,
    parse_row,
    write_jsonl,
)

IDS = ["agx-orin", "orin-nano", "jetson-nano", "pi5", "pi4-wifi", "pi4-lte", "phone-1", "phone-2"]  # mixed8


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_three_row_forms_read_as_the_same_kind_of_example():
    plain = parse_row({"prompt": "Hi?", "response": "Hello.", "domain": "greet"}, "x")
    alpaca = parse_row({"instruction": "Translate", "input": "chat", "output": "cat", "domain": "fr"}, "x")
    chat = parse_row({"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                   {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
                     "x")
    assert (plain.prompt, plain.response, plain.domain, plain.system) == ("Hi?", "Hello.", "greet", None)
    assert (alpaca.prompt, alpaca.response) == ("Translate\n\nchat", "cat")
    assert (chat.prompt, chat.response, chat.system) == ("and 3+3?", "6", "Be brief.")
    assert chat.context == (("user", "2+2?"), ("assistant", "4"))


def test_a_chat_row_is_formatted_with_its_history_and_written_back_the_same(tiny, tmp_path):
    _, tok = tiny
    ex = parse_row({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                 {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}],
                    "device": "pi5"}, "x")
    text = chat_prompt(tok, ex)
    assert text.index("2+2?") < text.index("4") < text.index("and 3+3?") and "system" not in text
    write_jsonl(tmp_path / "d.jsonl", [ex])
    assert load_jsonl(tmp_path / "d.jsonl") == [ex]


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "x"}, "field 'response' must be a non-empty string"),
    ({"question": "x", "answer": "y"}, "a row needs 'prompt' and 'response'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "at least a user and an assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, "must end with a user"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, "role: system|user"),
])
def test_bad_rows_name_file_line_and_what_is_wrong(tmp_path, row, needle):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "response": "fine"}, row])
    with pytest.raises(DataFormatError, match=rf"d.jsonl:2: .*{needle}"):
        load_jsonl(path)


def test_columns_map_a_users_names(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "Q", "answer": "A", "category": "c1", "site": "pi5"}])
    (ex,) = load_jsonl(path, {"prompt": "question", "response": "answer", "domain": "category", "device": "site"})
    assert (ex.prompt, ex.response, ex.domain, ex.device) == ("Q", "A", "c1", "pi5")
    with pytest.raises(DataFormatError, match="no column 'query'"):
        load_jsonl(path, {"prompt": "query", "response": "answer"})


def test_a_small_pool_is_never_reused_and_the_shortfall_is_said():
    pool = [Example(f"p{i}", f"r{i}", "a" if i % 2 else "b") for i in range(80)]
    notes: list[str] = []
    mixes = [{"a": 0.8, "b": 0.2}, {"a": 0.2, "b": 0.8}] * 4
    parts = split_pool(pool, mixes, 64, seed=0, notes=notes)
    dealt = [ex for p in parts for ex in p]
    assert len(dealt) == len(set(dealt)) == 80  # every example used once, by one client
    assert all(len(p) == len(set(p)) for p in parts)
    assert len(notes) == 1 and "without using one twice" in notes[0] and "'a' has 40 for" in notes[0]
    roomy = split_pool(pool, mixes[:2], 10, seed=0, notes=notes)
    assert [len(p) for p in roomy] == [10, 10] and len(notes) == 1


def test_per_device_files_are_each_devices_data_as_it_is(tmp_path):
    folder = tmp_path / "devices"
    folder.mkdir()
    for k, cid in enumerate(IDS):
        write_jsonl(folder / f"{cid}.jsonl", [Example(f"{cid} q{j}", "a", f"d{k % 2}") for j in range(k + 1)])
    write_jsonl(folder / "retired.jsonl", [Example("old", "a")])
    _jsonl(tmp_path / "eval.jsonl", [{"prompt": "e", "response": "a", "domain": "d0"}])
    cfg = load_config(overrides={"model": "tiny-llama", "data.train_dir": str(folder),
                                 "data.eval_file": str(tmp_path / "eval.jsonl")})
    notes: list[str] = []
    train, mixes, evals = build_data(cfg, IDS, notes)
    assert [len(t) for t in train] == list(range(1, 9))
    assert all(ex.prompt.startswith(cid) for cid, t in zip(IDS, train) for ex in t)
    assert mixes[0] == {"d0": 1.0, "d1": 0.0} and any("retired" in n for n in notes)
    with pytest.raises(ConfigError, match="no data for device"):
        build_data(cfg, IDS + ["pi-zero"], [])


def test_a_device_column_splits_a_pool_by_device_and_a_missing_eval_is_held_out_by_hash(tmp_path):
    rows = [{"prompt": f"question {i} of {cid}", "response": "answer", "device": cid} for cid in IDS for i in range(10)]
    cfg = load_config(overrides={"model": "tiny-llama", "data.train_file": str(_jsonl(tmp_path / "t.jsonl", rows))})
    notes: list[str] = []
    train, _, evals = build_data(cfg, IDS, notes)
    assert all({ex.device for ex in t} == {cid} for cid, t in zip(IDS, train))
    assert evals and not {ex.prompt for ex in evals} & {ex.prompt for t in train for ex in t}
    assert sum(map(len, train)) + len(evals) == 80 and any("held out for evaluation" in n for n in notes)


def test_system_prompt_none_for_user_data_unless_set_and_kept_by_the_built_in_tasks(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "response": "a"} for i in range(40)])
    cfg = load_config(overrides={"model": "tiny-llama", "data.train_file": str(path)})
    train, _, evals = build_data(cfg, IDS[:2])
    assert all(ex.system is None for t in train for ex in t + evals)
    cfg = load_config(overrides={"model": "tiny-llama", "data.train_file": str(path),
                                 "data.system_prompt": "You are a support agent."})
    train, _, evals = build_data(cfg, IDS[:2])
    assert {ex.system for t in train for ex in t + evals} == {"You are a support agent."}
    builtin, _, _ = build_data(load_config(overrides={"model": "tiny-llama"}), IDS[:2])
    assert {ex.system for ex in builtin[0]} == {SYSTEM_PROMPT}


def test_a_hugging_face_dataset_from_disk_and_from_a_csv_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": [f"Name colour {i}" for i in range(30)], "output": ["red", "blue", "green"] * 10,
            "topic": ["colours"] * 30}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                               "test": datasets.Dataset.from_dict({k: v[:5] for k, v in rows.items()})})
    dd.save_to_disk(str(tmp_path / "ds"))
    cfg = load_config(overrides={"model": "tiny-llama", "data.dataset": str(tmp_path / "ds"),
                                 "data.eval_split": "test", "data.columns": {"domain": "topic"}})
    train, _, evals = build_data(cfg, IDS[:3])
    assert len(evals) == 5 and {ex.domain for t in train for ex in t} == {"colours"}
    assert sum(map(len, train)) == 30 and train[0][0].response in ("red", "blue", "green")
    (tmp_path / "d.csv").write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(20)))
    cfg = load_config(overrides={"model": "tiny-llama", "data.dataset": str(tmp_path / "d.csv"),
                                 "data.columns": {"prompt": "question", "response": "answer"}})
    train, _, evals = build_data(cfg, IDS[:2])
    assert sum(map(len, train)) + len(evals) == 20
    cfg = load_config(overrides={"model": "tiny-llama", "data.dataset": str(tmp_path / "ds"),
                                 "data.dataset_split": "validation"})
    with pytest.raises(ConfigError, match="has no split 'validation'; it has train, test"):
        build_data(cfg, IDS[:2])


@pytest.mark.parametrize("overrides,needle", [
    ({"data.train_file": "t.jsonl", "data.dataset": "x"}, "give one of data.train_file"),
    ({"data.eval_file": "e.jsonl"}, "is for your own data"),
    ({"data.columns": {"answer": "a"}}, "data.columns.answer: unknown field"),
    ({"eval.metric": "bleu"}, "eval.metric: must be one of"),
    ({"train.lr_schedule": "step"}, "train.lr_schedule: must be one of"),
    ({"train.grad_accum": 0}, "train.grad_accum: must be at least 1"),
])
def test_bad_data_and_training_settings_fail_before_anything_starts(tmp_path, monkeypatch, overrides, needle):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "response": "a"}])
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides={"model": "tiny-llama", **overrides})


def test_held_out_loss_is_the_token_mean_per_domain_and_free_text_leads_with_it(tiny):
    from fedlora_edge.coordinator.evaluate import lead_metric, loss_scores, response_nll

    model, tok = tiny
    exs = [Example("Say a long sentence", "the quick brown fox jumps over the lazy dog " * 2, "prose"),
           Example("What is 1 + 1?", "2", "math"), Example("What is 2 + 2?", "4", "math")]
    nll = response_nll(model, tok, exs, 128, "cpu")
    assert [n for _, n in nll] == [len(tok(e.response + tok.eos_token, add_special_tokens=False).input_ids)
                                   for e in exs]
    scores = loss_scores(exs, nll)
    assert scores["loss"]["per_domain"]["math"] == pytest.approx((nll[1][0] + nll[2][0]) / (nll[1][1] + nll[2][1]))
    assert scores["perplexity"]["overall"] == pytest.approx(math.exp(scores["loss"]["overall"]))
    assert lead_metric("auto", tok, exs[:1], 8, builtin=False)[0] == "loss"
    assert lead_metric("auto", tok, exs[1:], 8, builtin=False)[0] == "exact_match"
    assert lead_metric("rouge_l", tok, exs, 8, builtin=False) == ("rouge_l", "set by eval.metric")


def test_rouge_l_scores_free_text_answers_per_domain():
    pytest.importorskip("rouge_score")
    from fedlora_edge.coordinator.evaluate import rouge_l

    exs = [Example("q1", "the cat sat on the mat", "a"), Example("q2", "a dog ran", "b")]
    got = rouge_l(exs, ["the cat sat on a mat", "nothing alike"])
    assert got["per_domain"]["a"] == pytest.approx(5 / 6) and got["per_domain"]["b"] == 0.0
    assert got["overall"] == pytest.approx((5 / 6) / 2)


def test_a_hub_that_cannot_be_reached_fails_at_once_with_a_hint(monkeypatch):
    from fedlora_edge.core.models import ModelNotFoundError, resolve_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    with pytest.raises(ModelNotFoundError, match="cannot be reached.*HF_HUB_OFFLINE=1"):
        resolve_model("someone/no-such-model-here")
    cfg = load_config(overrides={"model": "tiny-llama", "data.dataset": "someone/no-such-dataset"})
    with pytest.raises(ConfigError, match="data.dataset someone/no-such-dataset: the Hugging Face Hub .* cannot be reached"):
        build_data(cfg, IDS[:2])


def test_one_prefill_gives_the_answers_and_losses_of_two(tiny):
    """`evaluate`'s shared prefill (left-padded prompts, batches by length, the cache reused for
    the teacher-forced loss and greedy decoding) gives what `generate` and a separate
    teacher-forced pass give, in the examples' order."""
    import torch
    from peft import LoraConfig, get_peft_model

    from fedlora_edge.coordinator.evaluate import answers_and_nll, generate_answers, response_nll
    from fedlora_edge.core.data import generate_task

    model, tok = tiny
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # an adapter that changes the answers
    exs = [ex for t in ("add", "reverse", "upper") for ex in generate_task(t, 7, seed=2, split="eval")]
    exs.append(Example("Say a long sentence " * 3, "the quick brown fox", "prose"))  # lengths differ
    for batch, max_len in ((4, 128), (32, 128), (8, 20)):  # 20: prompts cut, as generate and training cut them
        answers, nll = answers_and_nll(pm, tok, exs, 6, "cpu", max_len, batch_size=batch)
        assert answers == generate_answers(pm, tok, exs, 6, "cpu", max_prompt_len=max_len)
        for (s, n), (s2, n2) in zip(nll, response_nll(pm, tok, exs, max_len, "cpu")):
            assert n == n2 and s == pytest.approx(s2, rel=1e-4, abs=1e-4)
        assert len(set(answers)) > 1  # not one answer repeated: a test that can tell orders apart
    pm.generation_config.repetition_penalty = 1.3  # a logits processor: both from generate and a separate pass
    answers, _ = answers_and_nll(pm, tok, exs, 6, "cpu", 128)
    assert answers == generate_answers(pm, tok, exs, 6, "cpu", max_prompt_len=128)
    pm.generation_config.repetition_penalty = 1.0
    pm.unload()


@pytest.mark.parametrize("row,want", [
    ({"prompt": "Hi?", "completion": "Hello."}, ("Hi?", "Hello.", (), None)),
    ({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                 {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
      "completion": [{"role": "assistant", "content": "6"}]},
     ("and 3+3?", "6", (("user", "2+2?"), ("assistant", "4")), "Be brief.")),
    ({"prompt": [{"role": "user", "content": "Hi?"}], "completion": "Hello."}, ("Hi?", "Hello.", (), None)),
])
def test_trl_prompt_completion_rows_read_as_prompt_and_response(row, want):
    ex = parse_row({**row, "domain": "greet"}, "x")
    assert (ex.prompt, ex.response, ex.context, ex.system) == want and ex.domain == "greet"
    if not ex.context and ex.system is None:  # the very example a {"prompt", "response"} row gives
        assert ex == parse_row({"prompt": ex.prompt, "response": ex.response, "domain": "greet"}, "x")


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     "'completion' as messages must be one assistant turn"),
    ({"prompt": "q", "completion": "a", "label": False}, "TRL's unpaired preference form.*is not supported"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference rows .* data.columns.response: chosen"),
    ({"text": "just text"}, "plain 'text' rows .* not supported"),
    ({"prompt": "q", "response": "a", "completion": "b"}, "'response' or 'completion', not both"),
    ({"completion": "a"}, "field 'prompt' must be a non-empty string \\(the row has no 'prompt'; its fields: completion"),
])
def test_forms_that_are_not_read_are_refused_saying_what_to_do(tmp_path, row, needle):
    with pytest.raises(DataFormatError, match=rf"d.jsonl:1: .*{needle}"):
        load_jsonl(_jsonl(tmp_path / "d.jsonl", [row]))


def test_a_column_that_does_not_exist_is_named_with_the_columns_that_do(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "Q", "answer": "A"}, {"question": "R", "answer": "B"}])
    with pytest.raises(DataFormatError, match=r"d.jsonl:1: no column 'answr' \(data.columns.response\); this "
                                              r"row's columns: answer, question"):
        load_jsonl(path, {"prompt": "question", "response": "answr"})
    with pytest.raises(DataFormatError, match=r"d.jsonl: no row has the column 'categroy' \(data.columns.domain\); "
                                              r"the rows' columns: answer, question"):
        load_jsonl(path, {"prompt": "question", "response": "answer", "domain": "categroy"})
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"question": ["Q"] * 5, "answer": ["A"] * 5}).save_to_disk(str(tmp_path / "ds"))
    cfg = load_config(overrides={"model": "tiny-llama", "data.dataset": str(tmp_path / "ds"),
                                 "data.columns": {"prompt": "question", "response": "answr"}})
    with pytest.raises(DataFormatError, match=r"no column 'answr' \(data.columns.response\); the dataset's "
                                              r"columns: question, answer"):
        build_data(cfg, IDS[:2])


def test_a_json_error_says_all_of_where_and_what(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n')
    with pytest.raises(DataFormatError) as err:
        load_jsonl(bad)
    assert str(err.value) == (f"{bad}:2: not valid JSON: Expecting ',' delimiter at column 16 of 31 (line 2), "
                              """here: '{"prompt": "a" "response": "b"}'""")
    bad.write_text('[\n  {"prompt": "a", "response": "b"}\n]\n')
    with pytest.raises(DataFormatError, match="d.jsonl:1: not valid JSON: Expecting value at the end of the line "
                                              r"\(line 1\).* one JSON object per line \(JSONL\)"):
        load_jsonl(bad)


def test_every_cut_example_is_counted_training_and_held_out_apart():
    from fedlora_edge.coordinator.partition import cut_note

    train = [(10, 5), (60, 10), (30, 40), (2, 64)]   # (prompt, response) tokens: 3 over 64, one all response
    held = [(20, 20), (50, 20)]
    note = cut_note(train, held, 64)
    assert note == ("3 of 4 training examples and 1 of 2 held-out ones are longer than train.max_seq_len 64 tokens "
                    "(chat-formatted prompt and response) and are cut from the left of the prompt, in training and "
                    "in evaluation alike; 1 of them have a response that alone fills it, so they keep none of their "
                    "prompt and their response is cut at its end; the longest has 70 tokens: train.max_seq_len 70 "
                    "would keep them all")
    assert cut_note(train, held, 70) is None


@pytest.mark.integration
def test_a_free_text_run_leads_with_the_loss_and_says_what_it_cut(tmp_path):
    import io

    from rich.console import Console

    from fedlora_edge.coordinator.console import ConsoleReporter
    from fedlora_edge.coordinator.simulate import Simulation

    rows = [{"prompt": f"Describe ticket {i}", "response": "The printer jams because the paper path needs a clean.",
             "domain": "hw"} for i in range(40)]
    cfg = load_config(overrides={"model": "tiny-llama", "method": "fedit", "rounds": 1, "clients_per_round": 2,
                                 "train.steps": 1, "train.batch_size": 2, "lora.rank": 2, "lora.max_rank": 4,
                                 "data.train_file": str(_jsonl(tmp_path / "t.jsonl", rows)),
                                 "data.samples_per_client": 4, "max_new_tokens": 2})
    buf = io.StringIO()

    report = Simulation(cfg, tmp_path / "run", ConsoleReporter(Console(file=buf, width=400), progress_every=0)).run()

    out = buf.getvalue()
    assert report["metrics"]["lead"] == "loss"
    (note,) = [n for n in report["data_notes"] if "longer than train.max_seq_len" in n]
    # 40 rows, 10 held out by hash, 30 dealt to mixed8's eight devices; each row is 80-92 character tokens
    assert note.startswith("30 of 30 training examples and 10 of 10 held-out ones are longer than train.max_seq_len "
                           "64 tokens") and note.endswith("train.max_seq_len 92 would keep them all")
    assert f"note: {note}" in " ".join(out.split())
    assert "base model: held-out loss " in out and out.index("held-out loss", out.index("base model")) \
        < out.index("exact match", out.index("base model"))
    from fedlora_edge.coordinator.plots import plot_figures

    assert [name for name, _ in plot_figures(report)] == ["loss.png", "accuracy.png", "bytes.png"]


@pytest.mark.parametrize("lead,line", [
    ("exact_match", "base model: exact match 10.0% a=20.0 b=0.0; held-out loss 2.500"),
    ("loss", "base model: held-out loss 2.500 a=2.000 b=3.000; exact match 10.0%"),
])
def test_the_base_models_line_leads_with_the_runs_metric(lead, line):
    import io

    from rich.console import Console

    from fedlora_edge.coordinator.console import ConsoleReporter

    acc = {"overall": 0.1, "per_domain": {"a": 0.2, "b": 0.0},
           "loss": {"overall": 2.5, "per_domain": {"a": 2.0, "b": 3.0}}}
    buf = io.StringIO()
    rep = ConsoleReporter(Console(file=buf, width=400), progress_every=0)

    rep.leading_metric(lead)
    rep.base(acc, [], 8)

    assert f"global rank R = 8; {line}\n" in buf.getvalue()
