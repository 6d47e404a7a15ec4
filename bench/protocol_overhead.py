"""Protocol overhead over a real broker on loopback: 10 client processes, a tiny model.

Runs the MQTT coordinator with 10 `fedlora client` processes (tiny-llama-4l, rank 32) for a few
rounds and prints, for every round after the first (the first loads the model in each client):

- coordinator overhead = exchange time (first plan sent -> last update in) minus the slowest
  client's own training time: what chunking, MQTT, validation and the coordinator's loop cost;
- bytes on the wire (MQTT PUBLISH packets of the uplink, headers, chunk framing, safetensors
  header, PUBACKs) / bytes of the trained tensors (numel x 4).

Targets: <= 200 ms and <= 1.02.  Every message is signed and checked (protocol 2), every accepted
update fsynced to the round journal before its ack: both are in the overhead.

    python bench/protocol_overhead.py [--broker embedded|mosquitto|mosquitto-tls] [--clients 10] [--rounds 4]

``mosquitto`` and ``mosquitto-tls`` start Mosquitto configured by `fedlora broker-config` for the
run's registry (passwords, per-device ACL; with TLS).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default="embedded", choices=["embedded", "mosquitto", "mosquitto-tls"])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default="tiny-llama-4l")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()

    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.emulate import emulate
    from fedlora_edge.coordinator.registry import Registry
    from fedlora_edge.core.profile import DeviceProfile, save_profile

    tmp = Path(tempfile.mkdtemp(prefix="fedlora-bench-"))
    prof = DeviceProfile(name="bench", memory_total_gb=16, memory_usable_gb=8, compute_gflops=1e6, uplink_mbps=1e5,
                         downlink_mbps=1e5, threads=1)
    save_profile(prof, tmp / "p.yaml")
    (tmp / "fleet.yaml").write_text(yaml.safe_dump({"devices": [{"id": "c", "profile": str(tmp / "p.yaml"),
                                                                 "count": args.clients}]}))
    cfg = load_config(overrides={
        "model": args.model, "method": "fedit", "fleet": str(tmp / "fleet.yaml"), "rounds": args.rounds,
        "clients_per_round": args.clients, "lora.rank": args.rank, "lora.max_rank": args.rank,
        "train.steps": 3, "train.batch_size": 4, "data.tasks": ["add"], "data.samples_per_client": 16,
        "data.eval_per_domain": 2, "max_new_tokens": 2, "eval_every": 1000})
    registry, broker, mosq = tmp / "registry", None, None
    if args.broker != "embedded":  # Mosquitto from `fedlora broker-config`, with the fleet enrolled first
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from mqttkit import Mosquitto

        from fedlora_edge.core.identity import save_credentials

        reg = Registry.create(registry)
        for i in range(1, args.clients + 1):  # where emulate looks for them (it enrols only what is missing)
            save_credentials(tmp / "out" / "devices" / f"c-{i}" / "credentials.json", reg.add(f"c-{i}", max_examples=16))
        mosq = Mosquitto(reg, tmp / "mosquitto", tls=args.broker == "mosquitto-tls")
        broker = mosq.address
    try:
        rep = emulate(cfg, tmp / "out", broker, registry=registry, log=lambda *_: None)
    finally:
        if mosq:
            mosq.stop()

    print(f"{args.clients} clients, {args.model}, rank {args.rank}, broker {args.broker}, rounds {args.rounds}")
    print(f"{'round':>5} {'exchange s':>10} {'slowest train s':>15} {'overhead ms':>11} {'wire/tensors':>12}")
    overheads, ratios = [], []
    for r in rep["rounds"][1:]:
        slowest = max(c["local_seconds"] for c in r["clients"])
        over = (r["exchange_seconds"] - slowest) * 1000
        wire = sum(c["uplink_wire_bytes"] for c in r["clients"])
        tensors = sum(c["tensor_bytes"] for c in r["clients"])
        overheads.append(over)
        ratios.append(wire / tensors)
        print(f"{r['round']:>5} {r['exchange_seconds']:>10.3f} {slowest:>15.3f} {over:>11.1f} {wire / tensors:>12.4f}")
    print(f"median coordinator overhead {statistics.median(overheads):.1f} ms (target <= 200); "
          f"median wire/tensor bytes {statistics.median(ratios):.4f} (target <= 1.02)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
