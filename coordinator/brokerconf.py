"""``fedlora broker-config mosquitto|emqx``: a real broker's configuration, from the device registry.

Written into one folder: the broker's configuration, its password file (the registry's PBKDF2
hashes, no plaintext: revoked devices left out), the topic ACL (each device reads and writes only
its own topics and the runs' ``round``; the coordinator of run ``R``, user ``coordinator@R``, only
``fedlora/R/`` topics, one login per run the registry knows), the client id bound to the user name,
bounds on what one client can make the broker hold (the largest message, queued messages and bytes
per client: :data:`MAX_PACKET_BYTES`, :data:`MAX_QUEUED_MESSAGES`, :data:`MAX_QUEUED_BYTES`), and TLS: the registry CA, a server certificate for ``hosts`` issued from
it, and optionally mutual TLS (every client must show a certificate from that CA; revoked
devices' certificates are in a CRL).  Run it again after ``fedlora devices add|revoke`` and reload
the broker (Mosquitto: ``kill -HUP``).  The Mosquitto output is exercised by the test suite
(Mosquitto 2.0); the EMQX output follows EMQX 5's documented file formats and is not.
"""

from __future__ import annotations

import socket
from pathlib import Path

from fedlora_edge.core import durable

from .pki import issue_client, issue_server, load_ca, write_crl
from .registry import COORDINATOR_ID, Registry, coordinator_user, parse_hash

DEVICE_WRITES = ("hello", "status", "up", "event")
DEVICE_READS = ("down", "ack")
# What one client can make the broker hold.  A message: a chunk (transport.chunk_bytes, 900 KiB by
# default) plus its header (at most 64 KiB) and signature.  Queued for one client (while it is away
# or reads slowly): a training program for the executorch trainer is the largest transfer (516 MiB
# for SmolLM2 at int8, 587 chunks); acks are few (the coordinator answers at most 64 refusals per
# device and round).
MAX_PACKET_BYTES = 2 * 2**20
MAX_QUEUED_MESSAGES = 4096
MAX_QUEUED_BYTES = 768 * 2**20


BROKER_USER = "mosquitto"  # whom Mosquitto runs as when started as root (its `user` option's default)
MOSQUITTO_FILES = ("mosquitto.conf", "passwd", "acl", "ca.pem", "server.pem", "server.key", "crl.pem")


def hand_to_broker(out: str | Path, user: str = BROKER_USER) -> list[str]:
    """Let the user Mosquitto runs as read the files :func:`mosquitto` wrote in ``out`` and write
    its persistence folder ``out/data``; returns the lines to print.

    Mosquitto started as root drops to ``user`` before it reads the password file, the ACL and the
    TLS key, which are written 0600 for their owner: as root's, the broker stops at once ("Unable to
    open pwfile").  Run as root where ``user`` exists, the files and ``data/`` are given to it (the
    secret ones stay 0600, now its own), and a folder on the way to ``out`` that it cannot enter is
    named with the command that lets it through.  Otherwise nothing is changed and the lines give the
    command to run before starting the broker as root (started as its owner, it reads them as they are)."""
    import os
    import pwd
    import stat

    out = Path(out).resolve()
    chown = f"chown -R {user}: {out}"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return [f"Mosquitto started as root runs as user '{user}', and there is none on this machine: start it "
                f"as the user who owns {out}, or create that user and run `{chown}`"]
    if os.geteuid() != 0:
        return [f"to start Mosquitto as root (it then runs as user '{user}'), first run `sudo {chown}`"]
    data = out / "data"
    for path in [data, *data.iterdir(), *(out / name for name in MOSQUITTO_FILES)]:
        if path.exists():
            os.chown(path, entry.pw_uid, entry.pw_gid)
    lines = [f"gave the files to user '{user}' (Mosquitto started as root runs as it)"]
    groups = set(os.getgrouplist(user, entry.pw_gid))
    for folder in [*reversed(out.parents), out]:
        st = folder.stat()
        bit = (stat.S_IXUSR if st.st_uid == entry.pw_uid else stat.S_IXGRP if st.st_gid in groups
               else stat.S_IXOTH)
        if not st.st_mode & bit:
            lines.append(f"but user '{user}' cannot enter {folder} (mode {stat.S_IMODE(st.st_mode):o}), so the broker "
                         f"cannot read them: write them where it can (--out /etc/mosquitto/fedlora) or run "
                         f"`chmod o+x {folder}`")
            break
    return lines


def default_hosts() -> list[str]:
    return sorted({"localhost", "127.0.0.1", socket.gethostname()})


def _tls_files(registry: Registry, out: Path, hosts: list[str], mtls: bool) -> dict[str, Path]:
    ca = load_ca(registry.folder)
    files = {"ca": out / "ca.pem", "cert": out / "server.pem", "key": out / "server.key"}
    durable.write_bytes(files["ca"], (registry.folder / "ca.pem").read_bytes())
    issue_server(ca, hosts, files["cert"], files["key"])
    if mtls:
        files["crl"] = out / "crl.pem"
        write_crl(ca, [e.cert_serial for e in registry.devices.values() if not e.active and e.cert_serial],
                  files["crl"])
        coord = registry.folder / "coordinator-client.pem"
        if not coord.is_file():  # the coordinator shows a certificate too
            cert, key, _ = issue_client(ca, COORDINATOR_ID)
            durable.write_bytes(registry.folder / "coordinator-client.key", key.encode(), 0o600)
            durable.write_bytes(coord, cert.encode())
    return files


def _logins(registry: Registry) -> list[tuple[str, str]]:
    """(user, password hash): a coordinator login per run the registry knows, then every active device."""
    registry.refresh()
    return [(coordinator_user(r), registry.coordinator_password_hash) for r in sorted(registry.runs)] + [
        (d, e.password_hash) for d, e in sorted(registry.devices.items()) if e.active]


def mosquitto(registry: Registry, out: str | Path, port: int = 8883, bind: str = "0.0.0.0", tls: bool = True,
              hosts: list[str] | None = None, mtls: bool = False) -> Path:
    """Mosquitto 2 files in ``out``; returns the path of ``mosquitto.conf``."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(out / "passwd", "".join(f"{u}:{h}\n" for u, h in _logins(registry)).encode(), 0o600)
    acl = ["# fedlora-edge topic ACL (generated by `fedlora broker-config mosquitto`)",
           "# the coordinator of each run (user coordinator@<run>): that run's topics only"]
    for r in sorted(registry.runs):
        acl += [f"user {coordinator_user(r)}", f"topic readwrite fedlora/{r}/#"]
    acl += ["", "# every device (user name = device id): its own topics and the runs' round only"]
    acl += [f"pattern write fedlora/+/dev/%u/{leaf}" for leaf in DEVICE_WRITES]
    acl += [f"pattern read fedlora/+/dev/%u/{leaf}" for leaf in DEVICE_READS] + ["pattern read fedlora/+/round", ""]
    durable.write_bytes(out / "acl", "\n".join(acl).encode())
    (out / "data").mkdir(exist_ok=True)
    conf = [f"# generated by `fedlora broker-config mosquitto` from the registry {registry.folder}",
            "# reload after `fedlora devices add|revoke` + this command again: kill -HUP <mosquitto pid>",
            "per_listener_settings false", "allow_anonymous false", f"password_file {out / 'passwd'}",
            f"acl_file {out / 'acl'}",
            "# QoS 1 bursts of chunks: the default queue limits drop them; bounded per client all the same",
            f"max_queued_messages {MAX_QUEUED_MESSAGES}", f"max_queued_bytes {MAX_QUEUED_BYTES}",
            "max_inflight_messages 100", f"max_packet_size {MAX_PACKET_BYTES}",
            "# retained messages and queued QoS 1 messages survive a broker restart",
            "persistence true", f"persistence_location {out / 'data'}/", "autosave_interval 30",
            f"listener {port} {bind}",
            "# a listener option: set before any listener it would open a default one on port 1883",
            "use_username_as_clientid true"]
    if tls:
        f = _tls_files(registry, out, hosts or default_hosts(), mtls)
        conf += [f"cafile {f['ca']}", f"certfile {f['cert']}", f"keyfile {f['key']}", "tls_version tlsv1.2"]
        if mtls:
            conf += ["require_certificate true", f"crlfile {f['crl']}"]
    durable.write_bytes(out / "mosquitto.conf", ("\n".join(conf) + "\n").encode())
    return out / "mosquitto.conf"


def emqx(registry: Registry, out: str | Path, port: int = 8883, bind: str = "0.0.0.0", tls: bool = True,
         hosts: list[str] | None = None, mtls: bool = False) -> Path:
    """EMQX 5 files in ``out`` (a configuration fragment to include, the users to bootstrap, the
    ACL); returns the path of ``emqx-fedlora.conf``."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = ["user_id,password_hash,salt,is_superuser"]
    iterations = set()
    for user, stored in _logins(registry):
        it, salt, digest = parse_hash(stored)
        iterations.add(it)
        rows.append(f"{user},{digest.hex()},{salt.decode()},false")
    if len(iterations) > 1:
        raise ValueError(f"the registry's password hashes use several iteration counts {sorted(iterations)}; "
                         "EMQX takes one")
    durable.write_bytes(out / "emqx-users.csv", ("\n".join(rows) + "\n").encode(), 0o600)
    acl = ["%% fedlora-edge topic ACL (generated by `fedlora broker-config emqx`)",
           *(f'{{allow, {{username, "{coordinator_user(r)}"}}, all, ["fedlora/{r}/#"]}}.' for r in sorted(registry.runs)),
           "{allow, all, publish, [" + ", ".join(f'"fedlora/+/dev/${{username}}/{x}"' for x in DEVICE_WRITES) + "]}.",
           "{allow, all, subscribe, [" + ", ".join(f'"fedlora/+/dev/${{username}}/{x}"' for x in DEVICE_READS)
           + ', "fedlora/+/round"]}.', "{deny, all}.", ""]
    durable.write_bytes(out / "emqx-acl.conf", "\n".join(acl).encode())
    it = iterations.pop() if iterations else 1000
    conf = [f"# generated by `fedlora broker-config emqx` from the registry {registry.folder}",
            "# include it from emqx.conf; users come from emqx-users.csv (bootstrapped on first start; after",
            "# `fedlora devices add|revoke`, import it again: emqx ctl or the REST API import_users?type=hash)",
            "mqtt.use_username_as_clientid = true", f"mqtt.max_packet_size = {MAX_PACKET_BYTES}",
            f"mqtt.max_mqueue_len = {MAX_QUEUED_MESSAGES}", "authentication = [", "  {",
            "    mechanism = password_based", "    backend = built_in_database", "    user_id_type = username",
            f"    password_hash_algorithm {{name = pbkdf2, mac_fun = sha512, iterations = {it}, dk_length = 64}}",
            f'    bootstrap_file = "{out / "emqx-users.csv"}"', "    bootstrap_type = hash", "  }", "]",
            "authorization {", "  no_match = deny", "  cache { enable = false }",
            f'  sources = [{{type = file, enable = true, path = "{out / "emqx-acl.conf"}"}}]', "}"]
    if tls:
        f = _tls_files(registry, out, hosts or default_hosts(), mtls)
        conf += ["listeners.tcp.default.enable = false", "listeners.ssl.default {", f'  bind = "{bind}:{port}"',
                 "  ssl_options {", f'    cacertfile = "{f["ca"]}"', f'    certfile = "{f["cert"]}"',
                 f'    keyfile = "{f["key"]}"']
        conf += ["    verify = verify_peer", "    fail_if_no_peer_cert = true"] if mtls else ["    verify = verify_none"]
        conf += ["  }", "}"]
    else:
        conf += [f'listeners.tcp.default.bind = "{bind}:{port}"']
    durable.write_bytes(out / "emqx-fedlora.conf", ("\n".join(conf) + "\n").encode())
    return out / "emqx-fedlora.conf"


RABBITMQ_PLUGINS = ("rabbitmq_mqtt", "rabbitmq_auth_backend_http", "rabbitmq_auth_backend_cache")
RABBITMQ_AUTH_CACHE_MS = 60_000  # how long a node keeps an answer of `fedlora broker-auth` (a revocation's delay)


def rabbitmq(registry: Registry, out: str | Path, port: int = 8883, bind: str = "0.0.0.0", tls: bool = True,
             hosts: list[str] | None = None, mtls: bool = False, auth_url: str = "http://127.0.0.1:8099/auth") -> Path:
    """RabbitMQ 3.10+ files in ``out`` for one node (its ``rabbitmq.conf`` and ``enabled_plugins``):
    the MQTT plugin on ``port``, users and the topic ACL from ``fedlora broker-auth`` at ``auth_url``
    (the registry as RabbitMQ's HTTP auth backend, its answers cached ``RABBITMQ_AUTH_CACHE_MS``), no
    anonymous logins, the largest message bounded, TLS from the registry's CA.  Returns the path
    of ``rabbitmq.conf``.  Every node of a cluster gets the same files (its own ports where several
    share a host) and its own ``fedlora broker-auth`` on loopback."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    auth = auth_url.rstrip("/")
    conf = [f"# generated by `fedlora broker-config rabbitmq` from the registry {registry.folder}",
            "# users and the topic ACL: `fedlora broker-auth` (the registry, read again when it changes)",
            "auth_backends.1 = cache", "auth_cache.cached_backend = http",
            f"auth_cache.cache_ttl = {RABBITMQ_AUTH_CACHE_MS}", "auth_http.http_method = post",
            f"auth_http.user_path = {auth}/user", f"auth_http.vhost_path = {auth}/vhost",
            f"auth_http.resource_path = {auth}/resource", f"auth_http.topic_path = {auth}/topic",
            "mqtt.allow_anonymous = false", "mqtt.vhost = /", "mqtt.exchange = amq.topic",
            f"max_message_size = {MAX_PACKET_BYTES}", "# MQTT only: no AMQP listener", "listeners.tcp = none"]
    if tls:
        f = _tls_files(registry, out, hosts or default_hosts(), mtls)
        conf += ["mqtt.listeners.tcp = none", f"mqtt.listeners.ssl.default = {bind}:{port}",
                 f"ssl_options.cacertfile = {f['ca']}", f"ssl_options.certfile = {f['cert']}",
                 f"ssl_options.keyfile = {f['key']}", "ssl_options.versions.1 = tlsv1.2"]
        conf += (["ssl_options.verify = verify_peer", "ssl_options.fail_if_no_peer_cert = true"] if mtls
                 else ["ssl_options.verify = verify_none"])
    else:
        conf += [f"mqtt.listeners.tcp.default = {bind}:{port}"]
    durable.write_bytes(out / "rabbitmq.conf", ("\n".join(conf) + "\n").encode())
    durable.write_bytes(out / "enabled_plugins", f"[{','.join(RABBITMQ_PLUGINS)}].\n".encode())
    return out / "rabbitmq.conf"
