"""Examples, built-in tasks, data files in the forms people have, chat formatting and scoring.

An :class:`Example` is a prompt and its response, with a domain, an optional system prompt and
optional earlier turns of a conversation.  The built-in tasks are heterogeneous domains whose
answers are checked exactly, generated from a seed; they carry their own system prompt
(:data:`SYSTEM_PROMPT`).  A prompt belongs to the held-out evaluation split of its domain iff a
hash of the prompt says so, so train and eval never share a prompt whatever the seeds.

A data file is JSONL, one example per line, in any of these forms (:func:`parse_row`):
``{"prompt", "response"}``; TRL's prompt-completion ``{"prompt", "completion"}`` (strings, or in
TRL's conversational form lists of ``{"role", "content"}`` messages whose completion is one
assistant turn); Alpaca's ``{"instruction", "input", "output"}``; or chat
``{"messages": [{"role", "content"}, ...]}`` ending with the assistant's turn.  Each may carry
``domain`` (default ``default``), ``system`` and ``device``.  Not supported, and refused saying
so: TRL's preference rows (``chosen``/``rejected``; ``data.columns.response: chosen`` trains on the
preferred answer), its unpaired preference rows (a boolean ``label``) and plain ``text`` rows.
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


FIELDS = ("prompt", "response", "completion", "domain", "system", "device", "instruction", "input", "output",
          "messages")
CONTENT = ("prompt", "response", "completion", "messages", "instruction", "output")  # a row's text, not a label


def _fields(obj: Mapping) -> str:
    return ", ".join(sorted(map(str, obj))) or "no fields"


def _text(obj: Mapping, key: str, where: str) -> str:
    """A required text field: a non-empty string."""
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise _not_text(obj, key, where)
    return v


def _optional_text(obj: Mapping, key: str, where: str) -> str | None:
    """An optional text field: absent (or null) is None, else a string (it may be empty)."""
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise _not_text(obj, key, where)
    return v


def _not_text(obj: Mapping, key: str, where: str) -> DataFormatError:
    return DataFormatError(f"{where}: field '{key}' must be a non-empty string"
                           + (f" (the row has no '{key}'; its fields: {_fields(obj)})" if key not in obj else ""))


def parse_row(obj, where: str, columns: Mapping[str, str] | None = None) -> Example:
    """One example from a row in any of the forms of the module text.  ``columns`` maps this
    module's field names to the row's (``{"prompt": "question", "domain": "category"}``); a row
    without a column mapped to its text (:data:`CONTENT`) fails naming it and the row's columns."""
    if not isinstance(obj, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}"
                              + (" (a file holds one object per line, not an array)" if isinstance(obj, list) else ""))
    if columns:
        for f, c in columns.items():
            if f in CONTENT and c not in obj:
                raise DataFormatError(f"{where}: no column {c!r} (data.columns.{f}); this row's columns: "
                                      f"{_fields(obj)}")
        obj = {**{k: v for k, v in obj.items() if k not in columns.values()},
               **{f: obj[c] for f, c in columns.items() if c in obj}}
    domain = obj.get("domain", "default")
    if not isinstance(domain, str) or not domain:
        raise DataFormatError(f"{where}: field 'domain' must be a non-empty string")
    device = _optional_text(obj, "device", where)
    system = _optional_text(obj, "system", where)
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
        extra = _optional_text(obj, "input", where)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return Example(prompt, _text(obj, "output", where), domain, system, (), device)
    if "completion" in obj:
        return _prompt_completion(obj, where, domain, system, device)
    if "prompt" not in obj and "response" not in obj:
        raise DataFormatError(f"{where}: a row needs 'prompt' and 'response' (or 'completion'), 'instruction' and "
                              f"'output', or 'messages'; this one has {_fields(obj)}{_unsupported(obj)}")
    if "response" not in obj and _unsupported(obj):
        raise DataFormatError(f"{where}: no 'response' or 'completion' beside 'prompt' (its fields: {_fields(obj)})"
                              f"{_unsupported(obj)}")
    return Example(_text(obj, "prompt", where), _text(obj, "response", where), domain, system, (), device)


def _unsupported(obj: Mapping) -> str:
    """What the error about a row in a form this module does not read adds (TRL's other forms)."""
    if "chosen" in obj or "rejected" in obj:
        return ("; preference rows (chosen/rejected) are not supported: to train on the preferred answers, set "
                "data.columns.response: chosen")
    if "text" in obj:
        return "; plain 'text' rows have no prompt and answer to train on, and are not supported"
    return ""


def _prompt_completion(obj: Mapping, where: str, domain: str, system: str | None, device: str | None) -> Example:
    """TRL's prompt-completion row: two strings, or in its conversational form two lists of
    messages (a string on one side stands for one user or assistant turn) whose completion is one
    assistant turn; the loss is on the completion, as TRL's ``completion_only_loss`` has it."""
    if "response" in obj:
        raise DataFormatError(f"{where}: a row has 'response' or 'completion', not both")
    if isinstance(obj.get("label"), bool):
        raise DataFormatError(f"{where}: a boolean 'label' (TRL's unpaired preference form) is not supported: a "
                              "completion labelled false would be trained on as a good one; keep the rows "
                              "labelled true and drop the label")
    prompt, completion = obj.get("prompt"), obj["completion"]
    if not isinstance(prompt, list) and not isinstance(completion, list):
        return Example(_text(obj, "prompt", where), _text(obj, "completion", where), domain, system, (), device)
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": _text(obj, "prompt", where)}]
    answer = (completion if isinstance(completion, list)
              else [{"role": "assistant", "content": _text(obj, "completion", where)}])
    if len(answer) != 1 or not isinstance(answer[0], Mapping) or answer[0].get("role") != "assistant":
        raise DataFormatError(f"{where}: 'completion' as messages must be one assistant turn "
                              "([{\"role\": \"assistant\", \"content\": ...}]); several turns or tool calls are "
                              "not supported")
    row = {"messages": [*turns, *answer], "domain": domain, "device": device}
    ex = parse_row(row, f"{where} (its prompt and completion as 'messages')")
    return ex if system is None or ex.system is not None else replace(ex, system=system)


def load_jsonl(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Example]:
    """Read one example per line in any of the forms of :func:`parse_row`; blank lines are skipped.
    A column of ``columns`` that no row has fails naming it and the columns the rows have."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    out = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{where}: {json_error(exc, line, lineno)}") from None
            if isinstance(obj, Mapping):
                seen.update(map(str, obj))
            out.append(parse_row(obj, where, columns))
    if not out:
        raise DataFormatError(f"{path}: no examples")
    for f, c in (columns or {}).items():
        if c not in seen:
            raise DataFormatError(f"{path}: no row has the column {c!r} (data.columns.{f}); the rows' columns: "
                                  f"{', '.join(sorted(seen))}")
    return out


def json_error(exc: json.JSONDecodeError, line: str, lineno: int) -> str:
    """The whole of a JSON error on one line of a JSONL file: what was expected, at which column,
    the text around it, and a hint when the file is a JSON document rather than JSONL."""
    text = line.rstrip("\r\n")
    lo = max(0, exc.pos - 30)
    around = ("..." if lo else "") + text[lo:exc.pos + 30] + ("..." if exc.pos + 30 < len(text) else "")
    hint = ""
    if lineno == 1 and text.strip() in ("[", "{") or text.lstrip().startswith("[{"):
        hint = ("; the file must hold one JSON object per line (JSONL), and this looks like one JSON document "
                "(an array, or an object over several lines)")
    at = "the end of the line" if exc.pos >= len(text) else f"column {exc.colno} of {len(text)}"
    joint = " " if exc.msg.endswith(" at") else " at "  # "Unterminated string starting at" says its own "at"
    return f"not valid JSON: {exc.msg}{joint}{at} (line {lineno}), here: {around!r}{hint}"


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


def example_lengths(tokenizer, examples: Iterable[Example]) -> list[tuple[int, int]]:
    """``(prompt tokens, response tokens with eos)`` of each example, chat-formatted, as
    :func:`encode_examples` counts them before it cuts (an example met twice is tokenised once)."""
    known: dict[Example, tuple[int, int]] = {}
    out = []
    for ex in examples:
        if ex not in known:
            known[ex] = (len(prompt_ids(tokenizer, ex)), len(response_ids(tokenizer, ex)))
        out.append(known[ex])
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


Block = list[tuple[list[int], int]]  # whole encoded examples packed into one row


def pack_examples(encoded: Sequence[tuple[list[int], int]], max_len: int) -> list[Block]:
    """Pack encoded examples (each at most ``max_len`` tokens: :func:`encode_examples` cut them)
    into rows of at most ``max_len`` tokens, first-fit decreasing: each example whole in one row,
    never split across two (TRL's ``packing_strategy="bfd"``).  Examples of equal length keep the
    order they came in, so a shuffled input gives other rows."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    blocks: list[Block] = []
    room: list[int] = []
    for i in order:
        n = len(encoded[i][0])
        if n > max_len:
            raise ValueError(f"an example of {n} tokens does not fit a packed row of {max_len}")
        at = next((b for b, r in enumerate(room) if r >= n), None)
        if at is None:
            blocks.append([])
            room.append(max_len)
            at = len(blocks) - 1
        blocks[at].append(encoded[i])
        room[at] -= n
    return blocks


def collate_packed(batch: Sequence[Block], pad_id: int) -> dict:
    """Rows of packed examples: ``input_ids``, ``position_ids`` restarting at 0 at each example, and
    ``labels`` (-100 off each example's response), right-padded to the longest row; no
    ``attention_mask``, so transformers reads the examples' bounds off ``position_ids`` and keeps
    each token's attention within its own example (its packed-sequence mask; TRL's padding-free
    form).  At a bound, the next example's first token is a prompt token (``labels`` -100), so no
    token is ever predicted from another example; the padding is a segment of its own, never scored."""
    import torch

    width = max(sum(len(ids) for ids, _ in block) for block in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, block in enumerate(batch):
        at = 0
        for seq, plen in block:
            n = len(seq)
            ids[i, at: at + n] = torch.tensor(seq)
            pos[i, at: at + n] = torch.arange(n)
            labels[i, at + max(plen, 1): at + n] = torch.tensor(seq[max(plen, 1):])  # a first token is never scored
            at += n
        pos[i, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


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
