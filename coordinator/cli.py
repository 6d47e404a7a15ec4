"""The ``fedlora`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from fedlora_edge.core import __version__

EXAMPLES = """\
examples:
  fedlora simulate --out runs/demo                       # SmolLM2, mixed fleet of 8, about 5 min on 2 cores
  fedlora simulate --preset quick --out runs/taste       # a one-minute taste
  fedlora simulate --method flexlora --rounds 3 --out runs/flex
  fedlora simulate --model tiny-llama --set train.steps=2 --out runs/tiny
  fedlora emulate --out runs/emu                         # broker + coordinator + one process per device
  fedlora devices init && fedlora devices add pi5      # enrol a device: writes pi5.credentials.json
  fedlora broker-config mosquitto --out broker/         # Mosquitto with TLS, passwords and per-device ACLs
  fedlora coordinator --broker mqtts://host:8883 --out runs/live
  fedlora client --broker mqtts://host:8883 --credentials pi5.credentials.json --data local.jsonl
  fedlora compare --methods fedit@min,hetlora,fslora --out runs/cmp   # several methods, one table
  fedlora plan --fleet mixed8 --method fed-plora         # what each device can train, and the method's knob
  fedlora profile --out profiles/this-machine.yaml       # measure this machine
  fedlora export --adapter runs/demo/adapter --format onnx --quant int8 --out runs/demo/onnx
  fedlora generate --artifact runs/demo/onnx --prompt "What is 12 + 30?"
"""


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _add_run_args(p: argparse.ArgumentParser, running: bool = True) -> None:
    from .config import RunConfig

    d = RunConfig(method_settings={})  # the defaults, without importing the methods (and torch) for --help
    p.add_argument("--config", help="run config YAML (flags below override it; examples/run.yaml lists every field)")
    p.add_argument("--preset", default="default", help="starting values: default or quick (default: default)")
    p.add_argument("--method", help=f"aggregation method, see `fedlora methods` (default: {d.method})")
    _add_plugin_arg(p)
    p.add_argument("--model", help="smollm2-135m, tiny-llama, a .gguf file, a model directory or a HF id "
                   f"(default: {d.model})")
    p.add_argument("--fleet", help=f"fleet name under profiles/fleets/ or a path (default: {d.fleet})")
    p.add_argument("--rounds", type=int, help=f"federated rounds (default: {d.rounds})")
    p.add_argument("--clients-per-round", type=int, dest="clients_per_round",
                   help=f"devices sampled per round, from the seed (default: {d.clients_per_round})")
    p.add_argument("--local-steps", type=int, dest="local_steps",
                   help=f"optimiser steps each device trains per round, train.steps (default: {d.train.steps})")
    p.add_argument("--seed", type=int, help=f"seed of the data split, sampling and training (default: {d.seed})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help=f"where the coordinator computes "
                   f"(default: {d.device}: CUDA when present)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.lr=1e-3 --set data.partition=iid")
    if running:
        p.add_argument("--log", choices=["none", "tensorboard", "mlflow"], default="none",
                       help="also log per-step losses per client, per-round metrics and bytes: tensorboard "
                       "(to DIR/tensorboard) or mlflow ($MLFLOW_TRACKING_URI, else DIR/mlruns) (default: none)")
        p.add_argument("--save-every", type=int, dest="save_every", metavar="N",
                       help="every N rounds, the global adapter as a peft checkpoint in DIR/checkpoints/round-NNNN/, "
                       f"with its model card; save_every in the config (default: {d.save_every}, off)")
        p.add_argument("--progress-every", type=float, default=30.0, metavar="S", dest="progress_every",
                       help="when the output is not a terminal (a log file), a progress line every S seconds "
                       "while a round runs (default: 30)")
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings (torch, torchao, transformers)")


def _add_engine_args(p: argparse.ArgumentParser, what: str, workers: bool = True) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help=f"local: this process (default). ray: {what}. Needs the ray extra: "
                   "pip install 'fedlora-edge[ray]'")
    p.add_argument("--address", metavar="HOST:PORT", help="with --engine ray: a running Ray cluster (`ray start "
                   "--head` prints it; or $RAY_ADDRESS); default: start one on this machine")
    if workers:
        p.add_argument("--workers", type=int, metavar="N", help="with --engine ray: training workers (default: the "
                       "cluster's CPUs / --cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=int, default=1, metavar="N", dest="cpus_per_worker",
                   help="with --engine ray: CPUs (torch threads) each worker or run reserves (default: 1)")


def _add_plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import a module that registers methods (@register) before the config is read: a .py "
                   "file's path or a module name on PYTHONPATH or in the current folder; repeat for several "
                   "(installed packages' 'fedlora_edge.methods' entry points load by themselves; docs/methods.md)")


def _add_export_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", action="store_true", help="after the run, export the global adapter once per "
                   "device class of the fleet (each profile's runtime and quant): the base and the adapter apart, as "
                   "`fedlora export` writes them, with parity reports, to DIR/export/")


def _config_from_args(args):
    from .config import load_config, parse_override
    from .plugins import load_plugins

    load_plugins(getattr(args, "plugin", None))  # first: the config may name their methods and sections
    overrides = dict(parse_override(s) for s in args.set)
    for flag in ("method", "model", "fleet", "rounds", "clients_per_round", "seed", "device", "save_every"):
        if getattr(args, flag, None) is not None:
            overrides[flag] = getattr(args, flag)
    if getattr(args, "local_steps", None) is not None:
        overrides["train.steps"] = args.local_steps
    return load_config(args.config, args.preset, overrides)


def _export_classes(args, cfg):
    """With --export: the fleet's device classes, checked before anything starts (None without)."""
    if not getattr(args, "export", False):
        return None
    from fedlora_edge.export.device_classes import check_ready, device_classes

    from .fleet import load_fleet
    from .methods import get_method

    classes = device_classes((d.id, d.profile) for d in load_fleet(cfg.fleet))
    check_ready(get_method(cfg.method), classes)
    return classes


def _export_after(cfg, out: Path, classes, console, profiles=None) -> int:
    """Export the run's adapter per device class; 3 if any class's parity is broken, else 0."""
    if classes is None:
        return 0
    from fedlora_edge.export.device_classes import device_classes, export_fleet

    if profiles is not None:  # the profiles the devices declared (coordinator), not the fleet file's
        classes = device_classes(profiles)
    rows = export_fleet(cfg.model, out / "adapter", classes, out / "export", log=console.print,
                        max_seq_len=max(256, cfg.train.max_seq_len))
    from .console import export_table

    console.print(export_table(rows, out / "export"))
    return 3 if any(r["parity"] != "ok" for r in rows) else 0


def cmd_simulate(args) -> int:
    from .console import ConsoleReporter
    from .simulate import Simulation
    from .tracking import tracked

    cfg = _config_from_args(args)
    classes = _export_classes(args, cfg)
    reporter = tracked(ConsoleReporter(progress_every=args.progress_every), args.log, args.out, cfg)
    reporter.console.print(f"[b]fedlora simulate[/b]: method {cfg.method}, model {cfg.model}, fleet {cfg.fleet}, "
                           f"{cfg.rounds} rounds x {cfg.clients_per_round} clients, {cfg.train.steps} local steps")
    sim = Simulation(cfg, args.out, reporter)
    if args.engine == "ray":
        sim.use_ray(args.workers, args.cpus_per_worker, args.address)
    report = sim.run()
    out = Path(args.out)
    adapters = out / "adapter" if sim.engine.method.global_model else out / "clients" / "*" / "adapter"
    plots = ["loss.png", "accuracy.png"] if sim.engine.lead == "loss" else ["accuracy.png", "loss.png"]
    reporter.console.print(f"report: {out / 'report.json'}; adapter: {adapters}; "
                           f"plots: {', '.join(str(out / p) for p in [*plots, 'bytes.png'])}")
    return max(_export_after(cfg, out, classes, reporter.console), _privacy_status(report))


def cmd_compare(args) -> int:
    from rich.markdown import Markdown

    from .compare import DEFAULT_METHODS, compare
    from .console import make_console

    cfg = _config_from_args(args)
    specs = [m.strip() for m in (args.methods or ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
    console = make_console()
    console.print(f"[b]fedlora compare[/b]: {len(specs)} runs ({', '.join(specs)}) on model {cfg.model}, fleet "
                  f"{cfg.fleet}, {cfg.rounds} rounds x {cfg.clients_per_round} clients, "
                  + (f"seed {cfg.seed}" if args.seeds == 1 else f"seeds {cfg.seed}..{cfg.seed + args.seeds - 1}"))
    if args.full_participation:
        from .fleet import load_fleet

        cfg = dataclasses.replace(cfg, clients_per_round=len(load_fleet(cfg.fleet)))
        console.print(f"full participation: every eligible device of the fleet trains every round "
                      f"(clients_per_round {cfg.clients_per_round})")
    compare(cfg, specs, args.out, fresh=args.fresh, console=console, log=args.log, seeds=args.seeds, jobs=args.jobs,
            allow_unequal=args.allow_unequal_fleets,
            ray={"address": args.address, "cpus": args.cpus_per_worker} if args.engine == "ray" else None)
    out = Path(args.out)
    console.print(Markdown((out / "compare.md").read_text()))
    console.print(f"table: {out / 'compare.md'}; numbers: {out / 'compare.json'}; plot: {out / 'compare.png'}; "
                  f"each run: {out}/{'seed-<seed>/' if args.seeds > 1 else ''}<run>/report.json")
    return 0


def _registry(args, create: bool = False):
    from .registry import Registry, RegistryError, default_registry

    folder = Path(args.registry).expanduser() if args.registry else default_registry()
    if create and not (folder / "registry.json").exists():
        return Registry.create(folder)
    try:
        return Registry(folder)
    except RegistryError as exc:
        from .config import ConfigError

        raise ConfigError(str(exc)) from None


def _coordinator_address(args, registry, run_id: str):
    """The broker the coordinator uses (None: start the embedded one), logged in as the coordinator."""
    from fedlora_edge.core.mqtt import parse_broker

    if args.broker in (None, "embedded"):
        return None
    return registry.coordinator_login(parse_broker(args.broker, args.username, ca_file=args.ca_file), args.ca_file,
                                      run_id=run_id)


def _add_broker_args(p: argparse.ArgumentParser, default_embedded: bool = True) -> None:
    p.add_argument("--broker", default="embedded" if default_embedded else None,
                   help="mqtt://host:port, mqtts://host:port (TLS), or 'embedded' (default: an in-process broker, "
                   "closed to all but the registry's devices)")
    p.add_argument("--registry", help="the device registry folder (default: $FEDLORA_REGISTRY or ~/.fedlora/registry; "
                   "`fedlora devices init` makes one)")
    p.add_argument("--username", help="the coordinator's broker user (default: 'coordinator@<run id>', a login of "
                   "its own per run); its password is the registry's, or $FEDLORA_MQTT_PASSWORD")
    p.add_argument("--ca-file", help="CA certificate for mqtts:// (default: the registry's CA)")
    p.add_argument("--tls-cert", help="embedded broker: serve TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="embedded broker: the certificate's private key (PEM)")
    p.add_argument("--insecure-broker", action="store_true", help="embedded broker: open to anyone (development "
                   "only; messages are still signed and checked)")


def _embedded(args, registry, console, host="127.0.0.1", port=None):
    from .broker import EmbeddedBroker

    if bool(args.tls_cert) != bool(args.tls_key):
        from .config import ConfigError

        raise ConfigError("--tls-cert and --tls-key go together")
    return EmbeddedBroker(host=host, port=port, registry=registry, tls_cert=args.tls_cert, tls_key=args.tls_key,
                          insecure=args.insecure_broker, log=console.print).start()


def _privacy_status(report: dict) -> int:
    """EXIT_PRIVACY_BUDGET when the run stopped early for its privacy budget (its outputs written)."""
    from .service import EXIT_PRIVACY_BUDGET

    why = (report.get("privacy") or {}).get("stopped")
    if why:
        print(f"fedlora: stopped after round {len(report['rounds'])}: {why}: exit status {EXIT_PRIVACY_BUDGET}",
              file=sys.stderr)
        return EXIT_PRIVACY_BUDGET
    return 0


def _exit_status(report: dict) -> int:
    from .service import EXIT_ROUNDS_FAILED

    stopped = _privacy_status(report)
    if stopped:
        return stopped

    failed = [r["round"] for r in report["rounds"] if r["status"] == "failed"]
    if failed:
        print(f"fedlora: round(s) {', '.join(map(str, failed))} failed (fewer valid updates than min_updates): "
              f"exit status {EXIT_ROUNDS_FAILED}", file=sys.stderr)
        return EXIT_ROUNDS_FAILED
    return 0


def cmd_coordinator(args) -> int:
    from .console import ConsoleReporter
    from .service import Coordinator, check_deployable, check_resume
    from .tracking import tracked

    cfg = _config_from_args(args)
    check_deployable(cfg)
    check_resume(args.out, args.resume)
    classes = _export_classes(args, cfg)
    reporter = tracked(ConsoleReporter(progress_every=args.progress_every), args.log, args.out, cfg)
    registry = _registry(args)
    address = _coordinator_address(args, registry, cfg.transport.run_id)
    embedded = None
    if address is None:
        embedded = _embedded(args, registry, reporter.console, args.bind, args.port)
        address = registry.coordinator_login(embedded.address, args.ca_file, run_id=cfg.transport.run_id)
        reporter.console.print(f"embedded MQTT broker listening on {'mqtts' if address.tls else 'mqtt'}://"
                               f"{args.bind}:{address.port}")
    try:
        coord = Coordinator(cfg, args.out, address, registry, reporter, resume=args.resume,
                            log=reporter.console.print)
        report = coord.run()
    finally:
        if embedded:
            embedded.stop()
    declared = []
    for c in coord.engine.clients:
        assert c.device is not None, "a fleet's client is a device (only the pooled participant has none)"
        declared.append((c.id, c.device.profile))
    return max(_export_after(cfg, Path(args.out), classes, reporter.console, declared), _exit_status(report))


def cmd_emulate(args) -> int:
    from .console import ConsoleReporter
    from .emulate import emulate
    from .tracking import tracked

    cfg = _config_from_args(args)
    classes = _export_classes(args, cfg)
    reporter = tracked(ConsoleReporter(progress_every=args.progress_every), args.log, args.out, cfg)
    reporter.console.print(f"[b]fedlora emulate[/b]: method {cfg.method}, model {cfg.model}, fleet {cfg.fleet}, "
                           f"{cfg.rounds} rounds x {cfg.clients_per_round} devices, one process per device")
    report = emulate(cfg, args.out, broker=None if args.broker in (None, "embedded") else args.broker,
                     registry=args.registry, tls=args.tls, ca_file=args.ca_file, insecure=args.insecure_broker,
                     reporter=reporter, log=reporter.console.print)
    from .console import device_timings_table

    reporter.console.print(device_timings_table(report["devices"]))
    reporter.console.print(f"report: {Path(args.out) / 'report.json'}; device logs: {Path(args.out) / 'devices'}")
    return max(_export_after(cfg, Path(args.out), classes, reporter.console), _exit_status(report))


def cmd_devices(args) -> int:
    from .registry import Registry, RegistryError, default_registry

    folder = Path(args.registry).expanduser() if args.registry else default_registry()
    if args.action in ("add", "revoke") and not args.id:
        from .config import ConfigError

        raise ConfigError(f"devices {args.action}: give the device id, e.g. `fedlora devices {args.action} pi5`")
    try:
        if args.action == "init":
            reg = Registry.create(folder)
            print(f"created the device registry in {reg.folder}: the coordinator's identity ({reg.folder}/coordinator.json, "
                  f"keep it private) and a TLS authority ({reg.folder}/ca.pem)")
            return 0
        reg = Registry(folder)
        if args.action == "add":
            from fedlora_edge.core.identity import save_credentials

            creds = reg.add(args.id, max_examples=args.max_examples, client_cert=args.client_cert,
                            replace=args.replace)
            out = Path(args.out or f"{args.id}.credentials.json")
            save_credentials(out, creds)
            print(f"enrolled {args.id}; its credentials are in {out} (mode 0600): move the file to the device and "
                  f"start it with `fedlora client --credentials {out.name} ...`. It holds the device's secret key and "
                  "broker password: nobody else needs it, and the registry keeps only the public key and a hash.")
            return 0
        if args.action == "revoke":
            e = reg.revoke(args.id)
            print(f"revoked {args.id} at {e.revoked_at}: the coordinator and the embedded broker refuse it from its next "
                  "message; for Mosquitto or EMQX run `fedlora broker-config` again and reload the broker")
            return 0
        rows = sorted(reg.devices.values(), key=lambda e: e.id)
        print(f"{'device':24s} {'state':8s} {'max examples':>12s}  enrolled              public key")
        for e in rows:
            from fedlora_edge.core.identity import b64

            print(f"{e.id:24s} {'active' if e.active else 'revoked':8s} "
                  f"{(str(e.max_examples) if e.max_examples else 'default'):>12s}  {e.enrolled_at:20s}  "
                  f"{b64(e.public_key)[:16]}...")
        print(f"{len(rows)} device(s) in {reg.folder}")
        return 0
    except RegistryError as exc:
        from .config import ConfigError

        raise ConfigError(str(exc)) from None


def cmd_broker_config(args) -> int:
    from . import brokerconf

    reg = _registry(args)
    for run in args.run or []:
        from .registry import RegistryError

        try:
            reg.add_run(run)
        except RegistryError as exc:
            from .config import ConfigError

            raise ConfigError(f"--run: {exc}") from None
    if not reg.runs:
        reg.add_run("default")  # the run id a config has unless it sets transport.run_id
    hosts = args.tls_host or None
    kw = dict(port=args.port or (8883 if not args.no_tls else 1883), bind=args.bind, tls=not args.no_tls, hosts=hosts,
              mtls=args.mtls)
    if args.kind == "rabbitmq":
        conf = brokerconf.rabbitmq(reg, args.out, auth_url=args.auth_url, **kw)
    else:
        conf = (brokerconf.mosquitto if args.kind == "mosquitto" else brokerconf.emqx)(reg, args.out, **kw)
    print(f"wrote {conf} and its files in {Path(args.out)}; coordinator logins for run(s) "
          f"{', '.join(sorted(reg.runs))} (a coordinator of a new run adds its run to the registry: run this again)")
    if args.kind == "mosquitto":
        for line in brokerconf.hand_to_broker(conf.parent):
            print(line)
        print(f"start it with `mosquitto -c {conf}`; after `fedlora devices add|revoke`, run this again and "
              "`kill -HUP` the broker")
    elif args.kind == "rabbitmq":
        print(f"on every node: RABBITMQ_CONFIG_FILE={conf.with_suffix('')} RABBITMQ_ENABLED_PLUGINS_FILE="
              f"{conf.parent / 'enabled_plugins'}, and beside it `fedlora broker-auth --registry {reg.folder} "
              f"--listen {args.auth_url.split('//')[-1].split('/')[0]}` (the users and the topic ACL); a node joins "
              "the cluster with `rabbitmqctl stop_app; rabbitmqctl join_cluster rabbit@FIRST; rabbitmqctl start_app` "
              "(docs/deploy.md). Devices added or revoked take effect within "
              f"{brokerconf.RABBITMQ_AUTH_CACHE_MS // 1000} s, with no reload")
    else:
        print(f"include {conf} from emqx.conf (EMQX 5); see docs/security.md")
    return 0


def cmd_broker_auth(args) -> int:
    import signal
    import threading

    from .broker_auth import AuthService

    reg = _registry(args)
    host, _, port = args.listen.rpartition(":")
    svc = AuthService(reg.folder, host or "127.0.0.1", int(port)).start()
    print(f"broker-auth: answering RabbitMQ's HTTP auth backend at {svc.url()} from the registry {reg.folder} "
          "(Ctrl-C stops)", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    svc.stop()
    return 0


def cmd_plan(args) -> int:
    from .console import make_console, plan_table

    make_console().print(plan_table(_config_from_args(args)))
    return 0


def cmd_profile(args) -> int:
    from fedlora_edge.core.profile import measure_profile, save_profile

    prof = measure_profile(args.name, args.uplink_mbps, args.downlink_mbps,
                           warn=lambda msg: print(f"fedlora: warning: {msg}", file=sys.stderr))
    if args.out:
        save_profile(prof, args.out)
        print(f"wrote {args.out}")
    import yaml

    print(yaml.safe_dump(prof.to_dict(), sort_keys=False), end="")
    return 0


def cmd_export(args) -> int:
    from fedlora_edge.export.build import check_format, export
    from fedlora_edge.export.parity import TOLERANCE, Tolerance, parity_report

    from .console import make_console

    check_format(args.format, args.quant)
    if args.model is None:
        from fedlora_edge.core.models import adapter_base

        args.model = (adapter_base(args.adapter) if args.adapter else None) or "smollm2-135m"
    console = make_console()
    console.print(f"[b]fedlora export[/b]: {args.model} + {args.adapter or 'no adapter'} -> {args.format} "
                  f"({args.quant}) in {args.out}")

    def log(line: str) -> None:  # a line per stage: a log file shows where a long export is, as a terminal does
        console.print(line, markup=False, highlight=False)

    artifact, meta, reference, tok = export(args.model, args.adapter, args.format, args.quant, args.out,
                                            args.max_seq_len, log=log, merged=args.merged)
    if meta["skipped_layers"]:
        console.print(f"left in fp32 ({args.quant} cannot take their shape): {', '.join(meta['skipped_layers'])}")
    tol = TOLERANCE[(args.format, args.quant)]
    if args.min_top1 is not None:
        tol = Tolerance(tol.max_abs, args.min_top1, tol.max_accuracy_drop)
    rep = parity_report(reference, tok, artifact, meta, per_task=args.prompts_per_task, tolerance=tol,
                        threads=args.threads, log=log)
    console.print((artifact.parent / "parity.md").read_text())
    console.print(f"artifact: {artifact} ({rep['size_bytes'] / 1e6:.1f} MB); parity: {artifact.parent / 'parity.json'}")
    return 0


def cmd_generate(args) -> int:
    from transformers import AutoTokenizer

    from fedlora_edge.core.data import Example, prompt_ids
    from fedlora_edge.export.parity import run_system_prompt
    from fedlora_edge.export.runners import artifact_folder, load_runner, read_meta

    meta = read_meta(args.artifact)
    tok = AutoTokenizer.from_pretrained(str(artifact_folder(args.artifact) / meta["tokenizer"]))
    run = load_runner(args.artifact, args.threads, args.adapter_file)
    system = run_system_prompt(meta) if args.system is None else (args.system or None)
    ids = prompt_ids(tok, Example(args.prompt, "", system=system), meta["max_seq_len"] - args.max_new_tokens)
    new, secs = run.generate(ids, args.max_new_tokens, tok.eos_token_id)
    print(tok.decode(new, skip_special_tokens=True))
    print(f"({len(new)} tokens, {1000 * secs / max(1, len(new)):.1f} ms per token)", file=sys.stderr)
    return 0


def cmd_methods(args) -> int:
    from .plugins import builtin_catalog, installed_plugins, load_plugins, summary

    rows = dict(builtin_catalog())  # read from the methods' source: no torch unless a plugin is imported
    if args.plugin:
        load_plugins(args.plugin)
        from .methods import get_method, method_names

        for n in method_names():
            if n not in rows:
                impl = type(get_method(n).impl)
                doc = sys.modules[impl.__module__].__doc__ or impl.__doc__ or ""
                rows[n] = f"{summary(doc)} (plugin {impl.__module__})"
    for ep in installed_plugins():
        rows.setdefault(ep.name, f"installed plugin {ep.value}, imported when a run names it")
    for n in sorted(rows):
        print(f"{n:12s} {rows[n]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning across heterogeneous "
                                 "edge devices.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"fedlora-edge {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("simulate", help="run a federated job in one process over an emulated fleet",
                       description="Run a federated LoRA job in one process: one shared frozen base model, "
                       "one adapter per client swapped in and out. Writes DIR/report.json, DIR/adapter/ "
                       "(peft format) and DIR/*.png.")
    _add_run_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    _add_export_arg(p)
    _add_engine_args(p, "clients train in Ray workers that keep one model around a base shared through Ray's "
                     "object store; the coordinator's side stays here (the same adapter, bit for bit)")
    p.set_defaults(fn=cmd_simulate)
    p = sub.add_parser("compare", help="run several methods on the same fleet, seed, data and rounds; one table",
                       description="Run each method of --methods with `simulate` on the same settings and print "
                       "one table: final accuracy (overall, per domain, on each client's own domain mix), MB up "
                       "and down per round, wall time. Writes DIR/<run>/ per method, DIR/compare.md, "
                       "DIR/compare.json and DIR/compare.png. A finished run with the same settings is reused.")
    _add_run_args(p)
    p.add_argument("--methods", help="comma-separated method specs: NAME or NAME@RANK, RANK a number, min or max "
                   "(the smallest/largest capacity in the fleet; sets lora.rank, i.e. fedit's rank). Default: "
                   "fedit@min,hetlora,flexlora,hafl,fslora,fed-plora,local,centralized). Every method must train on "
                   "the same devices: a method whose plan leaves out devices another trains stops the comparison "
                   "(see --allow-unequal-fleets)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--fresh", action="store_true", help="re-run methods whose finished run is already in DIR")
    p.add_argument("--seeds", type=int, default=1, help="run every method on this many seeds (--seed, --seed+1, "
                   "...): the table gives means with 95%% intervals and paired differences between methods, "
                   "marking those not within noise (default: 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in a process of its own with cores/jobs "
                   "torch threads (default: 1, in this process; the local engine)")
    _add_engine_args(p, "every (method, seed) run is a Ray task of --cpus-per-worker CPUs on whichever node has "
                     "them; its files come back here", workers=False)
    p.add_argument("--full-participation", action="store_true", help="every eligible device of the fleet trains "
                   "every round (clients_per_round = the fleet's size)")
    p.add_argument("--allow-unequal-fleets", action="store_true", help="run even when some methods would leave out "
                   "devices that others train (by default the comparison stops, naming them); the table marks "
                   "those rows")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("plan", help="print what each device of a fleet can train",
                       description="Print, per device of the fleet, the planner's capacity (largest LoRA rank "
                       "whose predicted memory fits and whose round fits the deadline) and the method's knob.")
    _add_run_args(p, running=False)
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("emulate", help="a deployment on this machine: broker, coordinator, one process per device",
                       description="Start a broker (embedded unless --broker is given), the coordinator, and one OS "
                       "process per device of the fleet, each held to its profile (threads, memory cap, compute "
                       "slow-down, bandwidth). Writes the same outputs as simulate, plus per-device timings.")
    _add_run_args(p)
    _add_broker_args(p)
    p.add_argument("--tls", action="store_true", help="embedded broker over TLS, with a certificate issued from the "
                   "registry's CA (the devices get the CA)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    _add_export_arg(p)
    p.set_defaults(fn=cmd_emulate)
    p = sub.add_parser("coordinator", help="run the coordinator over an MQTT broker",
                       description="Wait for the fleet's devices to say hello, then run the rounds over MQTT. "
                       "The run's state is saved after every round; --resume continues a stopped run.",
                       epilog="exit status: 0 all rounds ok; 2 bad config or broker connection; 3 export parity "
                       "broken; 4 a round failed; 5 too few devices in time; 6 the state, a checkpoint or the "
                       "outputs could not be written")
    _add_run_args(p)
    _add_broker_args(p)
    p.add_argument("--bind", default="127.0.0.1", help="embedded broker: address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="embedded broker: port (default 1883)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (and the run's state)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    _add_export_arg(p)
    p.set_defaults(fn=cmd_coordinator)
    p = sub.add_parser("client", help="run an edge device (see `fedlora client --help`)", add_help=False)
    p.set_defaults(fn=None)
    p = sub.add_parser("devices", help="enrol, list and revoke devices (the registry)",
                       description="The device registry: `init` makes one (the coordinator's identity and a TLS "
                       "authority); `add ID` enrols a device and writes its credentials file; `revoke ID` refuses it "
                       "from its next message; `list` shows them. The registry keeps public keys and password "
                       "hashes only.")
    p.add_argument("action", choices=["init", "add", "list", "revoke"])
    p.add_argument("id", nargs="?", help="device id (add, revoke)")
    p.add_argument("--registry", help="the registry folder (default: $FEDLORA_REGISTRY or ~/.fedlora/registry)")
    p.add_argument("--out", help="add: where to write the credentials file (default: ID.credentials.json)")
    p.add_argument("--max-examples", type=int, help="add: the most examples this device's updates may weigh "
                   "(default: the run's weights.max_examples)")
    p.add_argument("--client-cert", action="store_true", help="add: issue a client certificate for mutual TLS")
    p.add_argument("--replace", action="store_true", help="add: re-issue credentials of an enrolled device")
    p.set_defaults(fn=cmd_devices)
    p = sub.add_parser("broker-config", help="write Mosquitto, EMQX or RabbitMQ configuration from the registry",
                       description="Write a broker's configuration for the registry's devices: password file (hashes), "
                       "per-device topic ACL, client id bound to the user name, TLS with a server certificate from "
                       "the registry's CA, optionally mutual TLS. Run it again after devices are added or revoked.")
    p.add_argument("kind", choices=["mosquitto", "emqx", "rabbitmq"], help="rabbitmq: a node's rabbitmq.conf and "
                   "enabled_plugins (MQTT plugin; users and ACL from `fedlora broker-auth`, run beside every node)")
    p.add_argument("--auth-url", default="http://127.0.0.1:8099/auth", help="rabbitmq: where the node asks "
                   "`fedlora broker-auth` (default: http://127.0.0.1:8099/auth)")
    p.add_argument("--registry", help="the registry folder (default: $FEDLORA_REGISTRY or ~/.fedlora/registry)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the broker's files")
    p.add_argument("--port", type=int, help="listener port (default 8883 with TLS, 1883 without)")
    p.add_argument("--bind", default="0.0.0.0", help="listener address (default 0.0.0.0)")
    p.add_argument("--tls-host", action="append", help="a host name or address the server certificate is for "
                   "(repeat; default: localhost, 127.0.0.1 and this host's name)")
    p.add_argument("--no-tls", action="store_true", help="plain MQTT (not for networks you do not control)")
    p.add_argument("--mtls", action="store_true", help="mutual TLS: every client shows a certificate from the CA")
    p.add_argument("--run", action="append", metavar="RUN_ID", help="a run whose coordinator gets a login "
                   "(coordinator@RUN_ID, its own topics only); repeat. Runs a coordinator already used from this "
                   "registry are included; with none, 'default'")
    p.set_defaults(fn=cmd_broker_config)
    p = sub.add_parser("broker-auth", help="the registry as RabbitMQ's user database and topic ACL (HTTP auth backend)",
                       description="Answer RabbitMQ's HTTP auth backend from the registry: logins (PBKDF2 hashes), "
                       "the default vhost, amq.topic and each client's own MQTT queues, and the per-device topic ACL. "
                       "Run one beside every broker node, on loopback; `fedlora broker-config rabbitmq` points the "
                       "node at it. The registry is read again when it changes.")
    p.add_argument("--registry", help="the registry folder (default: $FEDLORA_REGISTRY or ~/.fedlora/registry)")
    p.add_argument("--listen", default="127.0.0.1:8099", metavar="HOST:PORT", help="default: 127.0.0.1:8099")
    p.set_defaults(fn=cmd_broker_auth)
    p = sub.add_parser("profile", help="measure this machine and write a device profile",
                       description="Measure memory (psutil) and float32 matmul throughput; bandwidth is given.")
    p.add_argument("--out", help="YAML file to write")
    p.add_argument("--name", help="profile name (default: host name)")
    p.add_argument("--uplink-mbps", type=float, default=100.0)
    p.add_argument("--downlink-mbps", type=float, default=100.0)
    p.set_defaults(fn=cmd_profile)
    p = sub.add_parser("export", help="export a base and an adapter for an edge runtime, with a KV cache",
                       description="Write an artifact with a KV cache in --out: ONNX (a base built by "
                       "onnxruntime-genai's model builder, cached and reused across runs, and the adapter as a "
                       "separate adapter.onnx_adapter that onnxruntime applies at run time) or ExecuTorch (XNNPACK: "
                       "model.<quant>.pte, the program with the adapter's LoRA branches, and base.<quant>.ptd, the "
                       "base's weights, the same bytes for every run's adapter), with the tokenizer, export.json, and a parity report "
                       "(parity.json, parity.md) against the merged PyTorch model: top-1 agreement on the answer "
                       "tokens of held-out prompts of the built-in tasks, max |Δlogits|, exact-match accuracy, size, "
                       "latency per token. Fails (exit 3) when parity is broken beyond the format's tolerance.",
                       epilog="what held on SmolLM2 adapters (top-1 agreement on answer tokens, docs/results.md): "
                       "SmolLM2's file is 4-bit (Q4_1) and onnx int4 and int8 keep its own codes: int4 0.96-1.00 over "
                       "five adapters, the quick and the default run's included; int8 0.962 on the quick run's adapter "
                       "and 0.984 on the default run's (quantized again it held 0.947 on the quick one, under its 0.95 "
                       "bar); on a base it must quantize again, int4 held 0.84-0.88, under its 0.90 bar; executorch "
                       "8da8w 0.90-0.98 over three 20-round adapters; executorch 8da4w does not hold its bar")
    p.add_argument("--model", help="the base model the adapter was trained on (default: the one the adapter "
                   "names in its fedlora.json or adapter_config.json; smollm2-135m without an adapter)")
    p.add_argument("--adapter", help="a peft adapter folder, e.g. runs/demo/adapter (default: the base alone)")
    p.add_argument("--format", required=True, choices=["onnx", "executorch"])
    p.add_argument("--quant", default="fp32", help="onnx: fp32 | int8 | int4 (weight-only MatMulNBits, blocks of 32; "
                   "from a 4-bit GGUF base both keep the file's codes); "
                   "executorch: fp32 | 8da8w | 8da4w (torchao, int8 dynamic activations) (default: fp32)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--max-seq-len", type=int, default=256, help="longest sequence the artifact takes, prompt and "
                   "answer: the KV cache's length (default 256)")
    p.add_argument("--merged", action="store_true", help="onnx: merge the adapter into the base's weights and build "
                   "one model (no adapter file, no LoRA branch: for devices that never swap adapters; the whole model "
                   "is the update, and a 4-bit GGUF base's own codes are quantized again)")
    p.add_argument("--prompts-per-task", type=int, default=8, help="held-out prompts per built-in task for the "
                   "parity report (default 8: 40 prompts, about 130 answer tokens)")
    p.add_argument("--min-top1", type=float, help="override the format's top-1 agreement tolerance")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the runtime while the parity report "
                   "times it (default 1: comparable across runtimes and machines)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("generate", help="run an exported model: greedy decoding of one prompt",
                       description="Load an artifact written by `fedlora export` (an ONNX folder or a .pte, with "
                       "its tokenizer beside it) and print the greedy answer to --prompt, decoded with the "
                       "runtime's KV cache.")
    p.add_argument("--artifact", required=True, help="the export's folder (ONNX), its model.onnx, or the .pte file")
    p.add_argument("--adapter-file", help="another run's update to run on this export's base: ONNX, its "
                   "adapter.onnx_adapter; ExecuTorch, its model.<quant>.pte (default: the one exported with it)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="the system prompt ('' for none; default: the one the run "
                   "trained with, recorded in the export)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=_cpus(), help="CPU threads of the runtime (default: the CPUs "
                   f"this process may use, here {_cpus()}; ExecuTorch does not read OMP_NUM_THREADS)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("methods", help="list the registered methods",
                       description="List the built-in methods, those the --plugin modules register, and the "
                       "installed packages' methods ('fedlora_edge.methods' entry points), each with its summary.")
    _add_plugin_arg(p)
    p.set_defaults(fn=cmd_methods)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:  # `fedlora client` normally starts in edge_client/cli.py, without this module
        from fedlora_edge.edge_client.client import main as client_main

        return client_main(argv[1:])
    from fedlora_edge.core.quiet import quiet_third_party

    args = build_parser().parse_args(argv)
    quiet_third_party(getattr(args, "verbose", False))
    try:
        return args.fn(args)
    except Exception as exc:
        status = _exit_status_of(exc)
        if status is None:
            raise
        # a ParityError's message says "parity broken" once
        print(f"fedlora: {exc}" if status == 3 else f"fedlora: error: {exc}", file=sys.stderr)
        return status


# the errors a command reports in one line (exit status 2), by module and class: they are looked up
# in the modules already imported (one that was not raised none of them), so that catching them
# imports nothing: `fedlora --help`, `devices`, `broker-config` and `methods` start without torch
ONE_LINE_ERRORS = (("fedlora_edge.coordinator.errors", "ConfigError"), ("fedlora_edge.export.runners", "ExportError"),
                   ("fedlora_edge.core.models", "ModelNotFoundError"), ("fedlora_edge.core.profile", "ProfileError"),
                   ("fedlora_edge.core.data", "DataFormatError"), ("fedlora_edge.core.mqtt", "BrokerAuthError"),
                   ("fedlora_edge.core.mqtt", "BrokerTLSError"), ("fedlora_edge.coordinator.emulate", "DeviceProcessError"),
                   ("fedlora_edge.core.lora", "TargetModulesError"))


def _raised(exc: BaseException, *where: tuple[str, str]) -> bool:
    """True when ``exc`` is an instance of one of the classes ``(module, name)`` (only the modules
    already imported are looked in)."""
    classes = tuple(getattr(sys.modules[m], n) for m, n in where if m in sys.modules)
    return bool(classes) and isinstance(exc, classes)


def _exit_status_of(exc: Exception) -> int | None:
    """The exit status of an error a command reports in one line (None: a bug, its traceback shows)."""
    if _raised(exc, ("fedlora_edge.export.parity", "ParityError")):
        return 3
    if _raised(exc, ("fedlora_edge.coordinator.service", "TooFewDevices")):
        return sys.modules["fedlora_edge.coordinator.service"].EXIT_TOO_FEW_DEVICES
    if _raised(exc, ("fedlora_edge.coordinator.errors", "StorageError")):
        from .service import EXIT_STORAGE

        return EXIT_STORAGE
    if isinstance(exc, TimeoutError) or _raised(exc, *ONE_LINE_ERRORS):
        return 2
    return None


if __name__ == "__main__":
    sys.exit(main())
