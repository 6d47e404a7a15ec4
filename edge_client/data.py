"""Examples, built-in tasks, data files in the forms people have, chat formatting and scoring.

An :class:`Example` is a prompt and its response, with a domain, an optional system prompt and
optional earlier turns of a conversation.  The built-in tasks are heterogeneous domains whose
answers are checked exactly, generated from a seed; they carry their own system prompt
(:data:`SYSTEM_PROMPT`).  A prompt belongs to the held-out evaluation split of its domain iff a
hash of the prompt says so, so train and eval never share a prompt whatever the seeds.

A data file is JSONL, one example per line, in any of three forms (:func:`parse_row`):
``{"prompt", "response"}``; Alpaca's ``{"instruction", "input", "output"}``; or chat
``{"messages": [{"role", "content"}, ...]}`` ending with the assistant's turn.  Each may carry
``domain`` (default ``default``), ``system`` and ``device``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

SYSTEM_PROMPT = "Reply with the answer only."  # the built-in tasks' instruction
EVAL_FRACTION = 5  # one prompt in five belongs to the held-out split


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    domain: str = "default"
    system: str | None = None                    # the system prompt (None: none)
    context: tuple[tuple[str, str], ...] = ()    # earlier (role, content) turns before the prompt
    device: str | None = None                    # the device the example belongs to, when the data says


def with_system(examples: Sequence[Example], system: str | None) -> list[Example]:
    """``examples`` with ``system`` as the system prompt of those that have none of their own."""
    if system is None:
        return list(examples)
    return [ex if ex.system is not None else replace(ex, system=system) for ex in examples]


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"What is {a} + {b}?", str(a + b), "add")


def _reverse(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(f"Reverse the letters of: {w}", w[::-1], "reverse")


def _upper(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(f"Write in capital letters: {w}", w.upper(), "upper")


def _parity(rng: random.Random) -> Example:
    n = rng.randint(10, 999)
    return Example(f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd", "parity")


def _count(rng: random.Random) -> Example:
    w = _word(rng, 2, 9)
    return Example(f"How many letters are in the word {w}?", str(len(w)), "count")


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add, "reverse": _reverse, "upper": _upper, "parity": _parity, "count": _count,
}


def is_eval_prompt(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % EVAL_FRACTION == 0


def generate_task(task: str, n: int, seed: int, split: str = "train") -> list[Example]:
    """``n`` examples of built-in ``task`` from ``split`` ('train' or 'eval'), deterministic in seed.

    Eval examples are distinct prompts; train examples may repeat (as real data does).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; built-in tasks are: {', '.join(TASKS)}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not '{split}'")
    rng = random.Random(f"{task}|{split}|{seed}")
    want_eval = split == "eval"
    out: list[Example] = []
    seen: set[str] = set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        ex = TASKS[task](rng)
        if is_eval_prompt(ex.prompt) != want_eval or (want_eval and ex.prompt in seen):
            continue
        seen.add(ex.prompt)
        out.append(replace(ex, system=SYSTEM_PROMPT))
    raise ValueError(f"task '{task}' cannot supply {n} distinct {split} examples")


class DataFormatError(ValueError):
    """A row of a user's data is not a valid example; the message names the file and line."""


FIELDS = ("prompt", "response", "domain", "system", "device", "instruction", "input", "output", "messages")


def _text(obj: Mapping, key: str, where: str, required: bool = True) -> str | None:
    v = obj.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or (required and not v.strip()):
        raise DataFormatError(f"{where}: field '{key}' must be a non-empty string")
    return v


def parse_row(obj, where: str, columns: Mapping[str, str] | None = None) -> Example:
    """One example from a row in any of the three forms (module text).  ``columns`` maps this
    module's field names to the row's (``{"prompt": "question", "domain": "category"}``)."""
    if not isinstance(obj, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if columns:
        missing = [c for f, c in columns.items() if c not in obj and f in ("prompt", "response", "messages",
                                                                           "instruction", "output")]
        obj = {**{k: v for k, v in obj.items() if k not in columns.values()},
               **{f: obj[c] for f, c in columns.items() if c in obj}}
        if missing and not any(k in obj for k in ("prompt", "messages", "instruction")):
            raise DataFormatError(f"{where}: no column {missing[0]!r} (data.columns); the row has "
                                  f"{', '.join(sorted(map(str, obj)))}")
    domain = obj.get("domain", "default")
    if not isinstance(domain, str) or not domain:
        raise DataFormatError(f"{where}: field 'domain' must be a non-empty string")
    device = _text(obj, "device", where, required=False)
    system = _text(obj, "system", where, required=False)
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise DataFormatError(f"{where}: 'messages' must be a list of at least a user and an assistant turn")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise DataFormatError(f"{where}: messages[{i}] must be {{role: system|user|assistant, content: str}}")
            turns.append((m["role"], m["content"]))
        if turns[-1][0] != "assistant" or turns[-2][0] != "user" or not turns[-1][1].strip():
            raise DataFormatError(f"{where}: 'messages' must end with a user turn and a non-empty assistant turn")
        if turns[0][0] == "system":
            system = turns[0][1]
            turns = turns[1:]
        if any(r == "system" for r, _ in turns):
            raise DataFormatError(f"{where}: a system turn may only come first in 'messages'")
        return Example(turns[-2][1], turns[-1][1], domain, system, tuple(turns[:-2]), device)
    if "instruction" in obj:
        instruction = _text(obj, "instruction", where)
        extra = _text(obj, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return Example(prompt, _text(obj, "output", where), domain, system, (), device)
    if "prompt" not in obj and "response" not in obj:
        raise DataFormatError(f"{where}: a row needs 'prompt' and 'response', 'instruction' and 'output', or "
                              f"'messages'; this one has {', '.join(sorted(map(str, obj))) or 'no fields'}")
    return Example(_text(obj, "prompt", where), _text(obj, "response", where), domain, system, (), device)


def load_jsonl(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Example]:
    """Read one example per line in any of the forms of :func:`parse_row`; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{where}: not valid JSON ({exc.msg})") from None
            out.append(parse_row(obj, where, columns))
    if not out:
        raise DataFormatError(f"{path}: no examples")
    return out


def example_row(ex: Example) -> dict:
    """The JSON row of ``ex`` that :func:`parse_row` reads back as ``ex``."""
    if ex.context:
        row: dict = {"messages": [{"role": r, "content": c} for r, c in ex.context]
                     + [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}]}
    else:
        row = {"prompt": ex.prompt, "response": ex.response}
    row["domain"] = ex.domain
    if ex.system is not None:
        row["system"] = ex.system
    if ex.device is not None:
        row["device"] = ex.device
    return row


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(example_row(ex)) + "\n")


def chat_prompt(tokenizer, ex: Example) -> str:
    """The prompt as the model sees it: its chat template where it has one, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "system", "content": ex.system}] if ex.system is not None else []
        msgs += [{"role": r, "content": c} for r, c in ex.context] + [{"role": "user", "content": ex.prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head = f"{ex.system}\n" if ex.system is not None else ""
    turns = "".join(f"{'Question' if r == 'user' else 'Answer'}: {c}\n" for r, c in ex.context)
    return f"{head}{turns}Question: {ex.prompt}\nAnswer: "


def _response_suffix(tokenizer) -> str:
    return tokenizer.eos_token or ""


def prompt_ids(tokenizer, ex: Example, max_len: int | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, cut from the left to ``max_len - 1`` when longer
    (the same cut training makes, so evaluation sees what training saw)."""
    ids = tokenizer(chat_prompt(tokenizer, ex), add_special_tokens=False).input_ids
    return ids[-(max_len - 1):] if max_len and len(ids) > max_len - 1 else ids


def response_ids(tokenizer, ex: Example) -> list[int]:
    return tokenizer(ex.response + _response_suffix(tokenizer), add_special_tokens=False).input_ids


def encode_examples(tokenizer, examples: Sequence[Example], max_len: int) -> list[tuple[list[int], int]]:
    """Token ids of prompt+response+eos, and the prompt length (loss is on the response only).

    Sequences longer than ``max_len`` are cut from the left of the prompt, keeping the response.
    """
    out = []
    for ex in examples:
        p = prompt_ids(tokenizer, ex)
        r = response_ids(tokenizer, ex)
        if len(r) >= max_len:
            r = r[: max_len - 1]
        p = p[-(max_len - len(r)):]
        out.append((p + r, len(p)))
    return out


def collate(batch: Sequence[tuple[list[int], int]], pad_id: int, width: int | None = None) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the response), to
    the longest sequence or to ``width`` (a fixed batch shape)."""
    import torch  # here, not at import: the edge client connects and says hello before loading torch

    longest = max(len(ids) for ids, _ in batch)
    if width is None:
        width = longest
    elif longest > width:
        raise ValueError(f"a sequence of {longest} tokens does not fit a batch width of {width}")
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (seq, plen) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, plen: len(seq)] = torch.tensor(seq[plen:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def normalize_answer(text: str) -> str:
    """What exact match compares: the first line, stripped of spaces, quotes and a final period."""
    line = text.strip().split("\n", 1)[0].strip()
    return line.strip("\"'` ").rstrip(".").strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def domain_counts(examples: Iterable[Example]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.domain] = counts.get(ex.domain, 0) + 1
    return counts


def domain_means(examples: Sequence[Example], values: Sequence[float]) -> dict:
    """``{"overall", "per_domain"}`` of one value per example: the mean per domain, and overall
    the mean over domains (a small domain counts as much as a large one)."""
    by: dict[str, list[float]] = {}
    for ex, v in zip(examples, values):
        by.setdefault(ex.domain, []).append(v)
    per = {d: sum(v) / len(v) for d, v in sorted(by.items())}
    return {"overall": sum(per.values()) / len(per) if per else 0.0, "per_domain": per}


def exact_hits(examples: Sequence[Example], answers: Sequence[str]) -> list[int]:
    return [int(exact_match(ans, ex.response)) for ex, ans in zip(examples, answers)]


def score(examples: Sequence[Example], answers: Sequence[str]) -> dict:
    """Exact match: ``{"overall": acc, "per_domain": {domain: acc}}`` (:func:`domain_means`)."""
    return domain_means(examples, exact_hits(examples, answers))
