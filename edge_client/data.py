"""Examples, built-in tasks, JSONL data, chat formatting and exact-match scoring.

An :class:`Example` is a ``(prompt, response, domain)`` triple.  The built-in tasks are
heterogeneous domains whose answers are checked exactly, generated from a seed.  A prompt belongs
to the held-out evaluation split of its domain iff a hash of the prompt says so, so train and
eval never share a prompt whatever the seeds.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PROMPT = "Reply with the answer only."
EVAL_FRACTION = 5  # one prompt in five belongs to the held-out split


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    domain: str = "default"


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
        out.append(ex)
    raise ValueError(f"task '{task}' cannot supply {n} distinct {split} examples")


class DataFormatError(ValueError):
    """A line of a user's JSONL file is not a valid example; the message names file and line."""


def load_jsonl(path: str | Path) -> list[Example]:
    """Read ``{"prompt", "response"[, "domain"]}`` objects, one per line; blank lines are skipped."""
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
            if not isinstance(obj, dict):
                raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for field in ("prompt", "response"):
                if not isinstance(obj.get(field), str) or not obj[field].strip():
                    raise DataFormatError(f"{where}: field '{field}' must be a non-empty string")
            domain = obj.get("domain", "default")
            if not isinstance(domain, str) or not domain:
                raise DataFormatError(f"{where}: field 'domain' must be a non-empty string")
            out.append(Example(obj["prompt"], obj["response"], domain))
    if not out:
        raise DataFormatError(f"{path}: no examples")
    return out


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"prompt": ex.prompt, "response": ex.response, "domain": ex.domain}) + "\n")


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: its chat template where it has one, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"{SYSTEM_PROMPT}\nQuestion: {prompt}\nAnswer: "


def _response_suffix(tokenizer) -> str:
    return tokenizer.eos_token or ""


def prompt_ids(tokenizer, prompt: str, max_len: int | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, cut from the left to ``max_len - 1`` when longer
    (the same cut training makes, so evaluation sees what training saw)."""
    ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
    return ids[-(max_len - 1):] if max_len and len(ids) > max_len - 1 else ids


def encode_examples(tokenizer, examples: Sequence[Example], max_len: int) -> list[tuple[list[int], int]]:
    """Token ids of prompt+response+eos, and the prompt length (loss is on the response only).

    Sequences longer than ``max_len`` are cut from the left of the prompt, keeping the response.
    """
    out = []
    for ex in examples:
        p = prompt_ids(tokenizer, ex.prompt)
        r = tokenizer(ex.response + _response_suffix(tokenizer), add_special_tokens=False).input_ids
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


def score(examples: Sequence[Example], answers: Sequence[str]) -> dict:
    """``{"overall": acc, "per_domain": {domain: acc}}``; overall is the mean over domains."""
    hits: dict[str, list[int]] = {}
    for ex, ans in zip(examples, answers):
        hits.setdefault(ex.domain, []).append(int(exact_match(ans, ex.response)))
    per = {d: sum(v) / len(v) for d, v in sorted(hits.items())}
    return {"overall": sum(per.values()) / len(per) if per else 0.0, "per_domain": per}
