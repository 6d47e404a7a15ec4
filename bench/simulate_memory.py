"""What `simulate` holds per participant: peak RSS at N = 8, 32, 100 clients in one round.

    python bench/simulate_memory.py [--model smollm2-135m] [--clients 8,32,100]

Each run is a fresh process (peak RSS is per process): a fleet of N Jetson AGX Orins (every one
trains rank 32 on q/v), one round of N clients, one local step of batch 1, tiny evaluation. Three
runs per N:

- fedit as `simulate` runs it: each update validated as soon as it is trained and folded into the
  round's running sums (streaming), its bytes, decoded copy and start blob released;
- flexlora, which needs every update at once (the SVD of their sum): each update's decoded
  factors kept to the round's end, bytes and start blob released;
- fedit with that release turned off (every update's bytes and start blob held to the round's
  end and decoded there, as `simulate` did before).

Prints the peak RSS, and the growth per participant over the smallest N in units of one update's bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(model: str, n: int, keep: bool, folder: Path, method: str = "fedit") -> None:
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.simulate import Simulation
    from fedlora_edge.core.quiet import quiet_third_party

    quiet_third_party()
    fleet = folder / "fleet.yaml"
    fleet.write_text("devices:\n" + "".join(f"  - {{id: d{i:03d}, profile: jetson-agx-orin}}\n" for i in range(n)))
    cfg = load_config(overrides={"model": model, "method": method, "fleet": str(fleet), "rounds": 1,
                                 "clients_per_round": n, "train.steps": 1, "train.batch_size": 1,
                                 "train.max_seq_len": 16, "data.samples_per_client": 1, "data.eval_per_domain": 1,
                                 "data.tasks": ["add"], "max_new_tokens": 1, "lora.rank": 32, "lora.max_rank": 32})
    sim = Simulation(cfg, folder / "out")
    if keep:
        sim._settle = lambda ret: ret  # noqa: SLF001 - the behaviour before the release, for the comparison
    report = sim.run()
    up = report["rounds"][0]["clients"][0]["uplink_bytes"]
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "update_mb": up / 1e6}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", default="8,32,100")
    ap.add_argument("--child", nargs=3, metavar=("N", "KEEP", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            child(args.model, int(args.child[0]), args.child[1] == "1", Path(tmp), args.child[2])
        return 0
    ns = [int(x) for x in args.clients.split(",")]
    modes = [("fedit", False, "fedit, streaming"), ("flexlora", False, "flexlora, factors kept"),
             ("fedit", True, "fedit, update bytes held")]
    rows = {}
    for method, keep, name in modes:
        for n in ns:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", str(n), str(int(keep)),
                                  method], capture_output=True, text=True, check=True).stdout
            rows[(name, n)] = json.loads(out.strip().splitlines()[-1])
            print(f"done: N={n} {name}", file=sys.stderr)
    up = rows[(modes[0][2], ns[0])]["update_mb"]
    print(f"model {args.model}, one update {up:.2f} MB")
    print("| N | " + " | ".join(f"peak RSS MB, {name} | per extra participant (x update)" for _, _, name in modes) + " |")
    print("|---|" + "---|---|" * len(modes))
    for n in ns:
        cells = [str(n)]
        for _, _, name in modes:
            peak = rows[(name, n)]["peak_rss_mb"]
            per = "-" if n == ns[0] else f"{(peak - rows[(name, ns[0])]['peak_rss_mb']) / (n - ns[0]) / up:.2f}"
            cells += [f"{peak:.0f}", per]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
