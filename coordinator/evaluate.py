"""Held-out evaluation: teacher-forced loss on the responses, and greedy answers scored by exact
match (and, when asked, ROUGE-L), per domain.

Loss is the mean negative log-likelihood per response token (nats), over each domain's tokens;
perplexity is its exponential.  ``overall`` of every metric is the mean over domains, so a small
domain counts as much as a large one.  Which metric leads a run is :func:`lead_metric`'s choice.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from fedlora_edge.core.data import (
    Example,
    collate,
    domain_means,
    encode_examples,
    exact_hits,
    prompt_ids,
    response_ids,
)

METRICS = ("auto", "exact_match", "loss", "rouge_l")


@torch.no_grad()
def generate_answers(model, tokenizer, examples: Sequence[Example], max_new_tokens: int, device,
                     batch_size: int = 32, max_prompt_len: int | None = None) -> list[str]:
    """Greedy answers to the prompts of ``examples`` (chat-formatted here, cut from the left like
    training when longer than ``max_prompt_len``), batched with left padding."""
    out: list[str] = []
    eos = tokenizer.eos_token_id
    for i in range(0, len(examples), batch_size):
        chunk = [prompt_ids(tokenizer, ex, max_prompt_len) for ex in examples[i: i + batch_size]]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, x in enumerate(chunk):
            ids[j, width - len(x):] = torch.tensor(x)
            mask[j, width - len(x):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                             use_cache=True)
        out.extend(tokenizer.decode(g[width:], skip_special_tokens=True) for g in gen)
    return out


def _teacher_forced(model, tokenizer, examples: Sequence[Example], max_seq_len: int, device, batch_size: int):
    """Per batch, the logits that predict each next token and the labels they predict (``-100``
    outside the responses), the sequences cut as training cuts them."""
    encoded = encode_examples(tokenizer, examples, max_seq_len)
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i: i + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        yield logits[:, :-1].float(), batch["labels"][:, 1:].to(device)


@torch.no_grad()
def response_nll(model, tokenizer, examples: Sequence[Example], max_seq_len: int, device,
                 batch_size: int = 16) -> list[tuple[float, int]]:
    """Per example, the summed negative log-likelihood of its response tokens (teacher-forced, the
    sequence cut as training cuts it) and their count."""
    out: list[tuple[float, int]] = []
    for logits, labels in _teacher_forced(model, tokenizer, examples, max_seq_len, device, batch_size):
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        mask = labels != -100
        out.extend(zip((nll * mask).sum(1).tolist(), mask.sum(1).tolist()))
    return out


@torch.no_grad()
def answer_rate(model, tokenizer, examples: Sequence[Example], max_seq_len: int, device, batch_size: int = 16) -> float:
    """The share of ``examples`` whose response is the model's greedy answer: every response token
    the most likely one after the prompt and the response's earlier tokens (teacher-forced, so one
    forward pass; greedy decoding would produce the response, then maybe more)."""
    hits = []
    for logits, labels in _teacher_forced(model, tokenizer, examples, max_seq_len, device, batch_size):
        mask = labels != -100
        hits.extend((((logits.argmax(-1) == labels) | ~mask).all(1) & mask.any(1)).tolist())
    return sum(hits) / len(hits) if hits else 0.0


def loss_scores(examples: Sequence[Example], nll: Sequence[tuple[float, int]]) -> dict:
    """``{"loss": {overall, per_domain}, "perplexity": {overall, per_domain}}`` from :func:`response_nll`."""
    sums: dict[str, list[float]] = {}
    for ex, (s, n) in zip(examples, nll):
        acc = sums.setdefault(ex.domain, [0.0, 0])
        acc[0] += s
        acc[1] += n
    per = {d: v[0] / v[1] for d, v in sorted(sums.items()) if v[1]}
    loss = {"overall": sum(per.values()) / len(per) if per else float("nan"), "per_domain": per}
    return {"loss": loss, "perplexity": perplexity(loss)}


def perplexity(loss: dict) -> dict:
    """``exp`` of a ``{"overall", "per_domain"}`` loss."""
    return {"overall": math.exp(loss["overall"]), "per_domain": {d: math.exp(v) for d, v in loss["per_domain"].items()}}


def rouge_l(examples: Sequence[Example], answers: Sequence[str]) -> dict:
    """ROUGE-L F1 of each answer against its reference (Google's ``rouge-score``), per domain."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise RuntimeError("eval.rouge_l needs the rouge-score package: pip install rouge-score") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return domain_means(examples, [scorer.score(ex.response, ans)["rougeL"].fmeasure
                                   for ex, ans in zip(examples, answers)])


# generation settings under which `generate(do_sample=False)` is not a plain argmax loop
_PROCESSORS = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "min_new_tokens": None, "min_length": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "sequence_bias": None, "exponential_decay_length_penalty": None}


def _plain_greedy(model) -> bool:
    """Whether the model's generation config adds no logits processor to greedy decoding."""
    gc = getattr(model, "generation_config", None)
    return gc is None or all(getattr(gc, k, v) in (v, None) for k, v in _PROCESSORS.items())


@torch.no_grad()
def answers_and_nll(model, tokenizer, examples: Sequence[Example], max_new_tokens: int, device, max_seq_len: int,
                    batch_size: int = 32) -> tuple[list[str], list[tuple[float, int]]]:
    """Greedy answers (the prompt cut as :func:`generate_answers` cuts it) and each response's
    summed negative log-likelihood and token count (the sequence cut as :func:`response_nll` and
    training cut it), from one prefill of each prompt: the prompts' key-value cache is computed
    once and serves both the teacher-forced pass over the responses and greedy decoding.  Where
    the two cuts differ (a prompt and response longer than ``max_seq_len``) that example's loss
    has its own pass; where the model's generation config adds logits processors (a repetition
    penalty...), both come from :func:`generate_answers` and :func:`response_nll`.  Batches group
    prompts of similar length (left-padded); results come back in the examples' order."""
    if not _plain_greedy(model):
        return (generate_answers(model, tokenizer, examples, max_new_tokens, device, max_prompt_len=max_seq_len),
                response_nll(model, tokenizer, examples, max_seq_len, device))
    encoded = encode_examples(tokenizer, examples, max_seq_len)
    prompts = [prompt_ids(tokenizer, ex, max_seq_len) for ex in examples]
    replies = [ids[plen:] for ids, plen in encoded]
    apart = [i for i, (ids, plen) in enumerate(encoded) if ids[:plen] != prompts[i]]  # the cuts differ
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(examples)
    nll: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for i in range(0, len(order), batch_size):
        rows = order[i: i + batch_size]
        b, width, rwidth = len(rows), max(len(prompts[j]) for j in rows), max(len(replies[j]) for j in rows)
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        rids = torch.full((b, rwidth), pad, dtype=torch.long)
        rmask = torch.zeros((b, rwidth), dtype=torch.long)
        for k, j in enumerate(rows):
            p, r = prompts[j], replies[j]
            ids[k, width - len(p):], mask[k, width - len(p):] = torch.tensor(p), 1
            rids[k, : len(r)], rmask[k, : len(r)] = torch.tensor(r), 1
        ids, mask, rids, rmask = ids.to(device), mask.to(device), rids.to(device), rmask.to(device)
        last = mask.sum(1) - 1  # each prompt's last position (positions count real tokens only)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)  # no logits over the prompt
        first = out.logits[:, -1].float()  # predicts each response's first token
        cache = out.past_key_values
        # teacher-forced over the responses, on a copy of the prompts' cache
        tf = model(input_ids=rids, attention_mask=torch.cat([mask, rmask], 1),
                   position_ids=last[:, None] + 1 + torch.arange(rwidth, device=ids.device)[None],
                   past_key_values=copy.deepcopy(cache), use_cache=True)
        labels = rids.masked_fill(rmask == 0, -100)
        ce = torch.nn.functional.cross_entropy
        tok_nll = ce(first, labels[:, 0], ignore_index=-100, reduction="none")
        if rwidth > 1:
            tok_nll = tok_nll + ce(tf.logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                   reduction="none").sum(1)
        del tf
        for k, (s, n) in enumerate(zip(tok_nll.tolist(), rmask.sum(1).tolist())):
            nll[rows[k]] = (s, n)
        # greedy decoding on the prompts' cache, as generate(do_sample=False) does
        nxt, done, pos, att, steps = first.argmax(-1), torch.zeros(b, dtype=torch.bool, device=ids.device), last, mask, []
        for step in range(max_new_tokens):
            nxt = nxt.masked_fill(done, pad)
            steps.append(nxt)
            done = done | (nxt == eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            pos = pos + 1
            att = torch.cat([att, torch.ones((b, 1), dtype=att.dtype, device=att.device)], 1)
            nxt = model(input_ids=nxt[:, None], attention_mask=att, position_ids=pos[:, None],
                        past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        gen = torch.stack(steps, 1) if steps else torch.zeros((b, 0), dtype=torch.long)
        for k, g in enumerate(gen.tolist()):
            answers[rows[k]] = tokenizer.decode(g, skip_special_tokens=True)
    if apart:
        for j, v in zip(apart, response_nll(model, tokenizer, [examples[j] for j in apart], max_seq_len, device)):
            nll[j] = v
    return answers, nll


def evaluate(model, tokenizer, examples: Sequence[Example], max_new_tokens: int, device,
             max_seq_len: int = 64, with_rouge: bool = False) -> dict:
    """Exact match (``overall``, ``per_domain``), ``loss`` and ``perplexity`` (and ``rouge_l``), and
    ``per_example``: each prompt's exact match (0/1) and loss per token, in the examples' order (what
    paired comparisons of methods resample).  One prefill per prompt serves the greedy answers and
    the loss (:func:`answers_and_nll`)."""
    answers, nll = answers_and_nll(model, tokenizer, examples, max_new_tokens, device, max_seq_len)
    hits = exact_hits(examples, answers)
    out = domain_means(examples, hits)
    out.update(loss_scores(examples, nll))
    if with_rouge:
        out["rouge_l"] = rouge_l(examples, answers)
    out["per_example"] = {"exact": hits,
                          "loss": [round(s / n, 5) if n else None for s, n in nll]}
    return out


SHORT_ANSWER_WORDS = 3  # exact match leads where the median answer has at most this many words


def lead_metric(choice: str, tokenizer, examples: Sequence[Example], max_new_tokens: int,
                builtin: bool) -> tuple[str, str]:
    """The metric that leads a run's summary, and why: ``exact_match`` where the answers are short
    exact answers (the built-in tasks; user data whose median answer has at most
    :data:`SHORT_ANSWER_WORDS` words and fits ``max_new_tokens``), else ``loss`` (exact match of
    free text is near 0 whatever the model learnt)."""
    if choice != "auto":
        return choice, "set by eval.metric"
    if builtin:
        return "exact_match", "the built-in tasks have short exact answers"
    words = statistics.median(len(ex.response.split()) for ex in examples)
    tokens = statistics.median(len(response_ids(tokenizer, ex)) - 1 for ex in examples)
    if words <= SHORT_ANSWER_WORDS and tokens <= max_new_tokens:
        return "exact_match", (f"the answers are short (median {words:g} words, {tokens:g} tokens <= "
                               f"max_new_tokens {max_new_tokens})")
    return "loss", (f"the answers are free text (median {words:g} words, {tokens:g} tokens): exact match "
                    "would be near 0 whatever the model learnt")


def mix_accuracy(per_domain: dict[str, float], mix: dict[str, float]) -> float:
    """A metric on a client's own data distribution: its per-domain values weighted by the mix."""
    total = sum(w for d, w in mix.items() if d in per_domain)
    return sum(per_domain[d] * w for d, w in mix.items() if d in per_domain) / total if total else 0.0
