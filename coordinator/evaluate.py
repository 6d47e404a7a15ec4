"""Exact-match evaluation by greedy generation on the held-out split of every domain."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edge_client.data import Example, prompt_ids, score


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, device,
                     batch_size: int = 32, max_prompt_len: int | None = None) -> list[str]:
    """Greedy answers to ``prompts`` (chat-formatted here, cut from the left like training when
    longer than ``max_prompt_len``), batched with left padding."""
    out: list[str] = []
    eos = tokenizer.eos_token_id
    for i in range(0, len(prompts), batch_size):
        chunk = [prompt_ids(tokenizer, p, max_prompt_len) for p in prompts[i: i + batch_size]]
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


def evaluate(model, tokenizer, examples: Sequence[Example], max_new_tokens: int, device,
             max_prompt_len: int | None = None) -> dict:
    answers = generate_answers(model, tokenizer, [e.prompt for e in examples], max_new_tokens, device,
                               max_prompt_len=max_prompt_len)
    return score(examples, answers)


def mix_accuracy(per_domain: dict[str, float], mix: dict[str, float]) -> float:
    """Accuracy on a client's own data distribution: per-domain accuracy weighted by its mix."""
    total = sum(w for d, w in mix.items() if d in per_domain)
    return sum(per_domain[d] * w for d, w in mix.items() if d in per_domain) / total if total else 0.0
