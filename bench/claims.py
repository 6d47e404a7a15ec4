"""The claims suite: each paper's claim tested where it can show, on the same devices and data for
every method, several seeds, paired differences with their 95 % intervals, and a verdict.

    python bench/claims.py --out runs/claims --jobs 2                  # the reduced suite (2 cores: hours)
    python bench/claims.py --out runs/claims --jobs 2 --only fslora    # one claim's runs and verdicts
    python bench/claims.py --out runs/claims --report                  # verdicts from the runs finished so far
    python bench/claims.py --out runs/claims-full --preset full --jobs 8 --set device=cuda   # more compute
    python bench/claims.py --out runs/claims-full --preset full --engine ray --address HEAD:6379   # a Ray cluster

Every run is a `fedlora simulate` of SmolLM2-135M-Instruct (or ``--set model=...``) under
``OUT/<arm>/seed-<s>/``; a finished run with the same settings is reused, so the suite is resumable
and ``--jobs N`` shares it over N processes (``cores / N`` torch threads each).

The setting (both presets): fleet ``claims8`` (2 devices at rank 32, 2 at rank 8, 4 at rank 2,
the ranks set by each device's uplink alone, so every method plans every device the same: no
method leaves anyone out, and ``compare``'s check says so), full participation (all 8 devices
every round), the built-in tasks dealt by domain (skew 0.9), evaluation after every round (so
convergence is read from curves), held-out loss as the lead metric with exact match beside it.
Reduced (what a 2-core CPU runs in about 5 hours with ``--jobs 2``: 69 runs of 7-8 minutes on one
core each): 4 rounds of 8 local AdamW steps (batch 4), 8 held-out prompts per task, 3 seeds; full:
10 rounds of 16 steps, 20 prompts per task, 5 seeds.

Arms and the claim each isolates (``ARMS``, ``CLAIMS``):

- reference: FedIT at rank 2 on every device (the smallest rank) and FedIT at rank 32 on the same
  devices given links that never bind (``claims8-fast``): does rank matter at all here?  And FedIT
  at rank 32 with the learning rate divided by 4: under AdamW with a fixed scale ``s`` the change
  of ``W`` per step grows with the rank (about as sqrt(r) for fresh components), so "rank helps"
  must beat "a larger step helps" (4 = sqrt(32 / 2)).
- Fed-PLoRA against HetLoRA and FlexLoRA, and the share of HetLoRA's global ``BA`` beyond a rank-2
  client's first 2 components (what truncation discards and Fed-PLoRA's fold keeps).
- HAFL against HAFL with zero-padding aggregation (the same importance selection: the aggregation
  rule is the only difference), the claim being faster convergence: the rounds each takes to reach
  the loss FedIT at rank 2 ends with, and the final loss; and HAFL against HetLoRA.
- FSLoRA at global rank 64 (so that no device has sketch ratio 1) against HetLoRA and FlexLoRA at
  rank 64, under local AdamW, and FSLoRA against HetLoRA under plain SGD (the proof's setting: no
  gradient clipping, learning rate 0.05, the project's SGD rate for on-device training).
- FedLEASE with one expert per task (5), a warm-up of one round (8 or 16 steps), expert rank 2 (every
  device downloads the experts), against FedIT at rank 2 and local training, on each client's own
  domain mix; the number of experts chosen and the clustering's agreement with the devices' main
  domains (ARI) per seed.
- CLAIR on contaminated fleets (2 of 8 devices train on shuffled labels): benign clients' own-mix
  loss against local training and FedIT, its decomposition every round and once (one round of
  ``rounds x steps`` local steps: the paper's preliminary local estimators), on the spread ranks of
  ``claims8`` and the homogeneous ranks of ``claims8-uniform``; detection precision and recall.

Verdicts: per comparison "A better than B" the paired difference A - B of the held-out loss
(per prompt, bootstrapped over seeds and prompts) or of each client's own-mix loss (per client,
bootstrapped over seeds and clients): **reproduced** when its 95 % interval lies below 0,
**reversed** above 0, **not reproduced** (within noise) when it holds 0.  Written to
``OUT/claims.md`` and ``OUT/claims.json``, with a loss-per-round plot per claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = {
    "reduced": {"rounds": 4, "train.steps": 8, "data.eval_per_domain": 8, "seeds": 3},
    "full": {"rounds": 10, "train.steps": 16, "data.eval_per_domain": 20, "seeds": 5},
}
COMMON = {"model": "smollm2-135m", "fleet": "claims8", "clients_per_round": 8, "train.batch_size": 4,
          "data.partition": "by_domain", "data.skew": 0.9, "eval.metric": "loss", "eval_every": 1,
          "lora.max_rank": 32}
CONTAMINATED = {"contamination.fraction": 0.25, "contamination.attack": "random_labels"}


def arms(preset: dict) -> dict[str, dict]:
    """Arm label -> its settings beyond COMMON and the preset."""
    r64 = {"lora.max_rank": 64}
    sgd = {"train.optimizer": "sgd", "train.lr": 0.05, "train.grad_clip": 0.0}  # plain SGD, as the proof has it
    one_shot = {"rounds": 1, "train.steps": preset["rounds"] * preset["train.steps"]}
    out = {
        "fedit-r2": {"method": "fedit", "lora.rank": 2},
        "fedit-r32-all": {"method": "fedit", "lora.rank": 32, "fleet": "claims8-fast"},
        "fedit-r32-all-lr4": {"method": "fedit", "lora.rank": 32, "fleet": "claims8-fast", "train.lr": 2.5e-4},
        "hetlora": {"method": "hetlora"},
        "flexlora": {"method": "flexlora"},
        "fed-plora": {"method": "fed-plora"},
        "hafl": {"method": "hafl"},
        "hafl-zeropad": {"method": "hafl", "hafl.aggregation": "zero_pad"},
        "local": {"method": "local"},
        "fslora-r64": {"method": "fslora", **r64},
        "hetlora-r64": {"method": "hetlora", **r64},
        "flexlora-r64": {"method": "flexlora", **r64},
        # FSLoRA trains a k-component sketch under the scale s*R/k (R/k = 32 on the rank-2 devices), so
        # its step is larger than the other methods' at one lora.scale: two smaller scales give it its
        # best setting (0.125 is the official code's rsLoRA 1/sqrt(64))
        "fslora-r64-s0.5": {"method": "fslora", **r64, "lora.scale": 0.5},
        "fslora-r64-s0.125": {"method": "fslora", **r64, "lora.scale": 0.125},
        "fslora-r64-sgd": {"method": "fslora", **r64, **sgd},
        "hetlora-r64-sgd": {"method": "hetlora", **r64, **sgd},
        "fedlease": {"method": "fedlease", "lora.rank": 2, "fedlease.max_experts": 5, "fedlease.warmup_rounds": 1},
    }
    for tag, fleet, fedit_rank in (("spread", "claims8", 2), ("uniform", "claims8-uniform", 8)):
        base = {"fleet": fleet, **CONTAMINATED}
        out[f"clair-{tag}"] = {"method": "clair", **base}
        out[f"clair-once-{tag}"] = {"method": "clair", **base, **one_shot}
        out[f"fedit-{tag}-contaminated"] = {"method": "fedit", "lora.rank": fedit_rank, **base}
        out[f"local-{tag}-contaminated"] = {"method": "local", **base}
    return out


@dataclasses.dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    metric: str  # loss (held-out, per prompt) | own_mix_loss (per client) | benign_own_mix_loss (benign clients)


@dataclasses.dataclass(frozen=True)
class Claim:
    name: str
    paper: str
    statement: str
    comparisons: tuple[Comparison, ...]


def C(a, b, metric="loss"):  # noqa: N802 - a short constructor for the table below
    return Comparison(a, b, metric)


CLAIMS = (
    Claim("rank", "(reference)", "a higher rank helps at this budget, beyond a larger step",
          (C("fedit-r32-all", "fedit-r2"), C("fedit-r32-all-lr4", "fedit-r2"), C("fedit-r32-all", "fedit-r32-all-lr4"))),
    Claim("fed-plora", "Fed-PLoRA (ICLR'26)", "parallel one-rank modules with Select-N-Fold beat truncation "
          "(HetLoRA) and SVD redistribution (FlexLoRA) on heterogeneous ranks",
          (C("fed-plora", "hetlora"), C("fed-plora", "flexlora"), C("fed-plora", "fedit-r2"))),
    Claim("hafl", "HAFL (ICC'25)", "rank-1 aggregation converges faster than zero-padding (same importance "
          "selection), and importance-aware freezing beats truncation",
          (C("hafl", "hafl-zeropad"), C("hafl", "hetlora"), C("hafl", "fedit-r2"))),
    Claim("fslora", "FSLoRA (arXiv 2501.19389)", "sketched sub-adapters at global rank 64 beat HetLoRA and FlexLoRA "
          "(AdamW), and HetLoRA under plain SGD (the proof's setting)",
          (C("fslora-r64", "hetlora-r64"), C("fslora-r64", "flexlora-r64"), C("fslora-r64-s0.5", "hetlora-r64"),
           C("fslora-r64-s0.125", "hetlora-r64"), C("fslora-r64-s0.5", "flexlora-r64"),
           C("fslora-r64-s0.125", "flexlora-r64"), C("fslora-r64-sgd", "hetlora-r64-sgd"))),
    Claim("fedlease", "FedLEASE (NeurIPS'25)", "clustered LoRA experts with an adaptive top-M router beat FedIT and "
          "local training on each client's own data",
          (C("fedlease", "fedit-r2", "own_mix_loss"), C("fedlease", "local", "own_mix_loss"))),
    Claim("clair", "CLAIR (arXiv 2605.21217)", "with 25 % of the devices contaminated, benign clients do better "
          "than with local training or FedAvg, and the contaminated ones are detected",
          tuple(C(a, b, "benign_own_mix_loss") for tag in ("spread", "uniform")
                for a in (f"clair-{tag}", f"clair-once-{tag}")
                for b in (f"local-{tag}-contaminated", f"fedit-{tag}-contaminated"))),
)


def build_runs(out: Path, preset: dict, seeds: list[int], only: list[str], sets: dict):
    """The grid: (arm, seed) -> compare.Run, for the arms the selected claims need."""
    from fedlora_edge.coordinator.compare import Run
    from fedlora_edge.coordinator.config import load_config

    table = arms(preset)
    wanted = sorted({x for c in CLAIMS if not only or c.name in only for cmp in c.comparisons
                     for x in (cmp.a, cmp.b)}, key=list(table).index)
    base = {**COMMON, **{k: v for k, v in preset.items() if k != "seeds"}}
    runs = {}
    # seed-major (the first seed of every arm finishes first), the contaminated arms after the rest
    for group in ([a for a in wanted if "contamination.attack" not in table[a]],
                  [a for a in wanted if "contamination.attack" in table[a]]):
        for seed in seeds:
            for arm in group:
                cfg = load_config(overrides={**base, **table[arm], **sets, "seed": seed})
                runs[(arm, seed)] = Run(arm, cfg, out / arm / f"seed-{seed}", f"{arm} seed {seed}")
    return runs


def _own_mix_losses(report: dict, benign_only: bool) -> dict[str, float]:
    """Client -> its own-mix held-out loss (its own model for a personalised method, else the
    global adapter weighed by its domain mix); only benign clients when ``benign_only``."""
    bad = set((report.get("contamination") or {}).get("clients") or []) if benign_only else set()
    personal = (report.get("personalised") or {}).get("clients") or {}
    out = {}
    final = report["global_adapter_accuracy"]
    for c in report["fleet"]:
        cid = c["client"]
        if cid in bad:
            continue
        if personal and cid in personal:
            out[cid] = personal[cid]["own_mix_loss"]
        else:
            mix = c["domain_mix"]
            per = final["loss"]["per_domain"]
            out[cid] = sum(w * per[d] for d, w in mix.items() if d in per) / max(1e-12, sum(
                w for d, w in mix.items() if d in per))
    return out


def paired_difference(reports_a: list[dict], reports_b: list[dict], metric: str) -> dict:
    """A - B over the same seeds: per prompt (``loss``) or per client (own-mix metrics), bootstrapped."""
    from fedlora_edge.coordinator.stats import paired_bootstrap, separated

    diffs = []
    for ra, rb in zip(reports_a, reports_b):
        if metric == "loss":
            ea, eb = ra["final_accuracy"]["per_example"]["loss"], rb["final_accuracy"]["per_example"]["loss"]
            diffs.append([x - y for x, y in zip(ea, eb) if x is not None and y is not None])
        else:
            oa, ob = (_own_mix_losses(r, metric.startswith("benign")) for r in (ra, rb))
            diffs.append([oa[c] - ob[c] for c in sorted(oa) if c in ob])
    m, lo, hi = paired_bootstrap(diffs)
    verdict = "reproduced" if hi < 0 else "reversed" if lo > 0 else "not reproduced (within noise)"
    return {"mean": m, "low": lo, "high": hi, "separated": separated(lo, hi), "verdict": verdict,
            "seeds": len(diffs)}


def rounds_to(report: dict, target: float) -> int | None:
    """The first round whose held-out loss is at or below ``target`` (None: never)."""
    for x in report["rounds"]:
        loss = ((x.get("accuracy") or {}).get("loss") or {}).get("overall")
        if loss is not None and loss <= target:
            return x["round"]
    return None


def truncation_share(folder: Path, r: int) -> float | None:
    """The share (Frobenius) of the global ``BA`` beyond the first ``r`` components, over every
    adapted module: what a rank-``r`` client's truncated start drops."""
    from safetensors.torch import load_file

    path = folder / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        return None
    t = load_file(str(path))
    beyond = total = 0.0
    for k in t:
        if ".lora_A." not in k:
            continue
        a, b = t[k].double(), t[k.replace(".lora_A.", ".lora_B.")].double()
        full = b @ a
        total += float((full ** 2).sum())
        beyond += float(((full - b[:, :r] @ a[:r]) ** 2).sum())
    return math.sqrt(beyond / total) if total else None


def extras(claim: Claim, reports: dict, seeds: list[int], out: Path) -> dict:
    """What a claim reports beside its paired differences."""
    have = lambda arm: all((arm, s) in reports for s in seeds)  # noqa: E731
    if claim.name == "fed-plora" and have("hetlora") and have("fed-plora"):
        return {"truncated_share_of_global_BA_beyond_rank_2": {
            arm: [truncation_share(out / arm / f"seed-{s}", 2) for s in seeds] for arm in ("hetlora", "fed-plora")}}
    if claim.name == "hafl" and have("hafl") and have("hafl-zeropad") and have("fedit-r2"):
        rows = {}
        for s in seeds:
            target = reports[("fedit-r2", s)]["final_accuracy"]["loss"]["overall"]
            rows[s] = {"target": target, **{arm: rounds_to(reports[(arm, s)], target) for arm in ("hafl", "hafl-zeropad")}}
        return {"rounds_to_fedit_r2_final_loss": rows}
    if claim.name == "fedlease" and have("fedlease"):
        sys.path.insert(0, str(ROOT / "bench"))
        from fedlease import clustering

        return {"experts_and_ari": {s: dict(zip(("experts", "ari"), clustering(reports[("fedlease", s)])))
                                    for s in seeds}}
    if claim.name == "clair":
        det = {}
        for arm in [a for a in ("clair-spread", "clair-once-spread", "clair-uniform", "clair-once-uniform") if have(a)]:
            det[arm] = {s: {k: (reports[(arm, s)]["contamination"].get("detection") or {}).get(k)
                            for k in ("precision", "recall")} for s in seeds}
        return {"detection": det}
    return {}


def mean_ci(values: list[float]) -> str:
    from fedlora_edge.coordinator.stats import mean_interval

    m, lo, hi = mean_interval(values)
    return f"{m:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


def write(out: Path, runs: dict, reports: dict, seeds: list[int], preset_name: str) -> dict:
    """claims.json, claims.md and a plot per claim, from the finished runs."""
    result = {"preset": preset_name, "seeds": seeds, "claims": [], "arms": {}}
    arm_names = sorted({a for a, _ in runs}, key=[a for a, _ in runs].index)
    for arm in arm_names:
        reps = [reports.get((arm, s)) for s in seeds]
        if any(r is None for r in reps):
            continue
        result["arms"][arm] = {
            "method": reps[0]["method"], "fleet": reps[0]["config"]["fleet"],
            "ranks": sorted({c["rank"] for x in reps[0]["rounds"] for c in x["clients"]}),
            "devices_trained": sorted({c["client"] for x in reps[0]["rounds"] for c in x["clients"]}),
            "loss": [r["final_accuracy"]["loss"]["overall"] for r in reps],
            "exact_match": [r["final_accuracy"]["overall"] for r in reps],
            "own_mix_loss": [r["final_accuracy"]["own_mix_loss"] for r in reps],
            "curve": [[(x.get("accuracy") or {}).get("loss", {}).get("overall") for x in r["rounds"]] for r in reps],
            "wall_seconds": [r["wall_seconds"] for r in reps]}
    for claim in CLAIMS:
        rows = []
        for cmp in claim.comparisons:
            if not all((x, s) in reports for x in (cmp.a, cmp.b) for s in seeds):
                continue
            d = paired_difference([reports[(cmp.a, s)] for s in seeds], [reports[(cmp.b, s)] for s in seeds], cmp.metric)
            rows.append({"a": cmp.a, "b": cmp.b, "metric": cmp.metric, **d})
        if rows:
            result["claims"].append({"name": claim.name, "paper": claim.paper, "statement": claim.statement,
                                     "comparisons": rows, **extras(claim, reports, seeds, out)})
    (out / "claims.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "claims.md").write_text(markdown(result))
    plot(result, out)
    return result


def markdown(result: dict) -> str:
    lines = [f"Claims suite, preset {result['preset']}, seeds {', '.join(map(str, result['seeds']))}. Held-out "
             "loss in nats per response token (lower is better); mean over the seeds with its 95 % t-interval.", "",
             "| arm | method | fleet | ranks | devices | held-out loss | exact match % | own-mix loss |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, a in result["arms"].items():
        lines.append(f"| {arm} | {a['method']} | {a['fleet']} | {','.join(map(str, a['ranks']))} | "
                     f"{len(a['devices_trained'])} | {mean_ci(a['loss'])} | {mean_ci([100 * x for x in a['exact_match']])} | "
                     f"{mean_ci(a['own_mix_loss'])} |")
    for c in result["claims"]:
        lines += ["", f"### {c['name']}: {c['paper']}", "", f"Claim: {c['statement']}.", "",
                  "| A | B | metric | A - B [95 % interval] | verdict (A better than B) |", "|---|---|---|---|---|"]
        for r in c["comparisons"]:
            text = f"{r['mean']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"
            lines.append(f"| {r['a']} | {r['b']} | {r['metric']} | {'**' + text + '**' if r['separated'] else text} | "
                         f"{r['verdict']} |")
        for key in ("truncated_share_of_global_BA_beyond_rank_2", "rounds_to_fedit_r2_final_loss", "experts_and_ari",
                    "detection"):
            if key in c:
                lines += ["", f"{key.replace('_', ' ')}: `{json.dumps(c[key], default=str)}`"]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for c in result["claims"]:
        arms_ = sorted({x for r in c["comparisons"] for x in (r["a"], r["b"])})
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm in arms_:
            curves = result["arms"].get(arm, {}).get("curve") or []
            if not curves or any(v is None for cur in curves for v in cur):
                continue
            mean = [sum(v) / len(v) for v in zip(*curves)]
            ax.plot(range(1, len(mean) + 1), mean, marker="o", label=arm)
        ax.set(xlabel="round", ylabel="held-out loss (global adapter), mean over seeds", title=f"{c['name']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"claims-{c['name']}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="reduced")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (processes), cores/jobs threads each")
    ap.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: every run a task on a Ray "
                    "cluster (--address, else one started on this machine), --cpus-per-run CPUs each")
    ap.add_argument("--address", help="with --engine ray: the cluster's address (`ray start --head` prints it)")
    ap.add_argument("--cpus-per-run", type=int, default=1, help="with --engine ray: CPUs (torch threads) per run")
    ap.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the preset's)")
    ap.add_argument("--only", help="comma-separated claims: " + ", ".join(c.name for c in CLAIMS))
    ap.add_argument("--arms", help="comma-separated arms to run or report, in that order, each ARM (every seed) or "
                    "ARM@SEED (default: every arm the claims need); a comparison that lacks a seed of one of its "
                    "arms is left out")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
    ap.add_argument("--report", action="store_true", help="no new runs: verdicts from the runs finished so far")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = ap.parse_args(argv)
    from fedlora_edge.coordinator.compare import check_same_devices, reusable, run_all
    from fedlora_edge.coordinator.config import ConfigError, parse_override

    preset = PRESETS[args.preset]
    seeds = list(range(args.seeds or preset["seeds"]))
    only = [x.strip() for x in args.only.split(",")] if args.only else []
    unknown = [x for x in only if x not in {c.name for c in CLAIMS}]
    if unknown:
        print(f"--only: unknown claim(s) {unknown}; claims: {', '.join(c.name for c in CLAIMS)}", file=sys.stderr)
        return 2
    try:
        sets = dict(parse_override(s) for s in args.set)
        out = Path(args.out)
        runs = build_runs(out, preset, seeds, only, sets)
        if args.arms:
            picked = []  # in the order given: ARM (every seed) or ARM@SEED
            for item in (x.strip() for x in args.arms.split(",") if x.strip()):
                arm, _, seed = item.partition("@")
                keys = [k for k in runs if k[0] == arm and (not seed or str(k[1]) == seed)]
                if not keys:
                    raise ConfigError(f"--arms: no run '{item}'; arms: {', '.join(dict.fromkeys(a for a, _ in runs))}; "
                                      f"seeds: {', '.join(map(str, seeds))}")
                picked += [k for k in keys if k not in picked]
            runs = {k: runs[k] for k in picked}
        from fedlora_edge.coordinator.compare import Entry

        by_fleet: dict[str, list] = {}  # the fairness check of `compare`, per fleet the arms share
        for (arm, seed), r in runs.items():
            if seed == seeds[0] and r.cfg.contamination.attack == "none":
                by_fleet.setdefault(r.cfg.fleet, []).append(Entry(arm, r.cfg))
        for es in by_fleet.values():
            check_same_devices(es)
    except ConfigError as exc:
        print(f"claims: {exc}", file=sys.stderr)
        return 2
    order = list(runs)
    print(f"{len(order)} runs ({len({a for a, _ in order})} arms x {len(seeds)} seeds), preset {args.preset}")
    if args.dry_run:
        for key in order:
            print(f"  {runs[key].name}: {runs[key].folder}")
        return 0
    if args.report:
        reports = {k: rep for k in order if (rep := reusable(runs[k].folder, runs[k].cfg)) is not None}
        print(f"{len(reports)} of {len(order)} runs finished")
    else:
        ray = {"address": args.address, "cpus": args.cpus_per_run} if args.engine == "ray" else None
        done = run_all([runs[k] for k in order], jobs=args.jobs, ray=ray)
        reports = dict(zip(order, done))
    out.mkdir(parents=True, exist_ok=True)
    result = write(out, runs, reports, seeds, args.preset)
    for c in result["claims"]:
        for r in c["comparisons"]:
            print(f"{c['name']:10s} {r['a']:>22s} - {r['b']:<26s} {r['metric']:20s} {r['mean']:+.3f} "
                  f"[{r['low']:+.3f}, {r['high']:+.3f}]  {r['verdict']}")
    print(f"verdicts: {out / 'claims.md'}; numbers: {out / 'claims.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
