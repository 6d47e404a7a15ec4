"""Every command in README.md and docs/*.md runs as written (issue: "The first hour of a practitioner").

Each fenced ``bash`` block is cut into commands (a line with its ``\\`` continuations; a ``for``
loop up to its ``done``; comments dropped).  A page's commands run in order, in a folder of their
own that looks like the repository's root (its top-level entries linked in, so that ``.venv``,
``scripts/``, ``examples/`` and ``profiles/`` are where the pages say), with a fresh registry
(``FEDLORA_REGISTRY``) and ``HOME``, after the files a reader brings are written there
(:func:`reader_files`: a fleet, a device profile, data).  Every page gets the same substitutions
(:func:`placed`): host names that need a network or DNS become ``localhost``, port 8883 a free
port (also given to ``broker-config``, whose default it is), and folders outside the work folder
(``/srv``, ``/etc``) folders inside it.  Nothing else is changed, except where :data:`HOW` says so.

:data:`HOW` says how each command is checked, per tier: a command it has no line for fails the
test (a new command in the docs needs a line here).  Per tier, one of:

- a template: the command run with ``{cmd}`` standing for it (``"{cmd}"``: as written); the
  default tier gives a command that takes minutes with SmolLM2 its quick variant on the tiny model
  (``--model tiny-llama``, ``--preset quick``); the slow tier runs the SmolLM2 command, as written
  or in its quick variant;
- :data:`FLAGS`, for what takes hours or needs what a test machine lacks (the benchmarks, llama.cpp
  built from source): the program exists and takes every flag the command gives it, and a
  ``fedlora`` run's settings load (its method, fleet, config file and values);
- None: not run, for the reason given (the test suite itself; a network download).

How it runs: ``fg`` (it must exit 0), ``server`` (started in the background and stopped at the
end of the page: Mosquitto, which a reader starts in a terminal of its own) or ``bg`` (started in
the background, as a coordinator that waits for its devices, and it must exit 0 by the page's end).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
FLAGS = "flags"
TINY = "{cmd} --model tiny-llama --preset quick"
RUN_SH = "fedlora emulate --out runs/demo"  # what scripts/run.sh runs once scripts/setup.sh has installed


@dataclass(frozen=True)
class How:
    default: str | None                 # the default tier: a template, FLAGS, or None (not run)
    slow: str | None = "same"           # the slow tier: the same, or its own
    kind: str = "fg"                    # fg | bg | server
    why: str = ""                       # for None and FLAGS, and for a changed command
    says: str | None = None             # the slow tier: what its output must hold (the SmolLM2 run's answer)

    def tier(self, slow: bool) -> str | None:
        return self.default if not slow or self.slow == "same" else self.slow


# (page, the command's start as a regular expression, how): the first line that matches is used
HOW: list[tuple[str, str, How]] = [
    # -- README.md
    ("README.md", r"bash scripts/test\.sh", How(None, why="the test suite itself (it runs this test)")),
    ("README.md", r"bash scripts/run\.sh$", How(RUN_SH + " --preset quick --model tiny-llama",
                                                 RUN_SH + " --preset quick",
                                                 why="scripts/setup.sh installs from the network; then the "
                                                 "script runs `fedlora emulate --out runs/demo` (8 min with "
                                                 "SmolLM2: its quick variant)")),
    ("README.md", r"bash scripts/run\.sh --preset quick$", How(FLAGS, FLAGS, why="the line above ran it")),
    ("README.md", r"\. \.venv/bin/activate && fedlora simulate --preset quick", How(TINY, "{cmd}")),
    ("README.md", r"\. \.venv/bin/activate && fedlora simulate --out", How(TINY, FLAGS,
                                                                          why="5 min with SmolLM2: the line "
                                                                          "above is its quick variant")),
    ("README.md", r"fedlora devices (init|add)", How("{cmd}")),
    ("README.md", r"fedlora broker-config mosquitto", How("{cmd}")),
    ("README.md", r"mosquitto -c", How("{cmd}", kind="server")),
    ("README.md", r"fedlora coordinator", How("{cmd} --model tiny-llama --rounds 1 --clients-per-round 1 "
                                              "--local-steps 2", kind="bg")),
    ("README.md", r"fedlora client", How("{cmd}")),
    ("README.md", r"fedlora export .*--format onnx", How("{cmd} --min-top1 0", "{cmd}",
                                                         why="the default tier's adapter (runs/demo above) is the "
                                                         "tiny model's, whose random weights give near-flat logits: "
                                                         "top-1 agreement measures nothing there")),
    ("README.md", r"fedlora export .*--format executorch", How("{cmd}")),
    ("README.md", r"fedlora generate", How("{cmd}", says="42")),  # the quick and the default adapter: 42
    ("README.md", r"fedlora simulate --fleet edge-runtimes .*--export", How(FLAGS, TINY, why="an hour with "
                                                                             "SmolLM2 (two training programs, "
                                                                             "four exports): the tiny model's")),
    ("README.md", r"python bench/", How(FLAGS, why="benchmarks: minutes to hours each")),
    # -- docs/methods.md
    ("docs/methods.md", r"fedlora methods", How("{cmd}")),
    ("docs/methods.md", r"fedlora simulate", How(TINY, why="minutes with SmolLM2")),
    # -- docs/security.md
    ("docs/security.md", r"fedlora devices", How("{cmd}")),
    ("docs/security.md", r"python -c ", How("{cmd}")),
    ("docs/security.md", r"fedlora coordinator .*--tls-cert", How("{cmd} --model tiny-llama --rounds 1 "
                                                                  "--clients-per-round 1 --local-steps 2", kind="bg")),
    ("docs/security.md", r"fedlora client", How("{cmd}")),
    ("docs/security.md", r"fedlora broker-config", How("{cmd}")),
    ("docs/security.md", r"mosquitto -c", How("{cmd}", kind="server")),
    ("docs/security.md", r"fedlora coordinator --broker", How(
        "{cmd} --model tiny-llama --rounds 1 --clients-per-round 1 --local-steps 2 & coordinator=$!; "
        "fedlora client --broker mqtts://localhost:{port} --credentials pi5.credentials.json --data local.jsonl "
        "&& wait $coordinator", why="with the device as the block above starts it")),
    # -- docs/results.md, docs/deploy.md: how each figure was measured (hours on 2 cores)
    ("docs/results.md", r"pip (download|install)", How(None, why="llama.cpp's sources from the network, built")),
    ("docs/results.md", r"", How(FLAGS, why="a measurement: hours on 2 cores")),
    ("docs/deploy.md", r"python bench/", How(FLAGS, why="a measurement: minutes to hours")),
    ("docs/deploy.md", r"fedlora ", How(FLAGS, why="a cluster of machines (Ray) or of broker nodes (RabbitMQ: "
                                                   "tests/test_rabbitmq.py runs it; tests/test_ray_engine.py the engine)")),
]


def _strip_comment(line: str) -> str:
    """``line`` without its shell comment (a ``#`` at the start of a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands(page: str) -> list[tuple[int, str]]:
    """``(line number, command)`` of every fenced bash block of ``page``, in order."""
    text = (ROOT / page).read_text()
    out = []
    for m in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        first = text.count("\n", 0, m.start(1)) + 1
        lines = m.group(1).splitlines()
        i = 0
        while i < len(lines):
            at, line = first + i, _strip_comment(lines[i]).rstrip()
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1].rstrip() + " " + _strip_comment(lines[i]).strip()
            if re.match(r"for\b", line):
                while not re.search(r"\bdone\b", line) and i + 1 < len(lines):
                    i += 1
                    line += "\n" + _strip_comment(lines[i]).rstrip()
            i += 1
            if line.strip():
                out.append((at, line.strip()))
    return out


def how(page: str, cmd: str) -> How:
    for where, start, rule in HOW:
        if where == page and re.match(start, cmd):
            return rule
    pytest.fail(f"{page}: no line in tests/test_docs_commands.py HOW says how to check `{cmd}`: add one")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def placed(cmd: str, work: Path, port: int) -> str:
    """``cmd`` in the test's places: no DNS, a free port, folders inside the work folder."""
    for host in ("broker.local", "broker.example.org", "coord.example.org"):
        cmd = cmd.replace(host, "localhost")
    for outside in ("/srv/fedlora", "/etc/mosquitto/fedlora", "/etc/emqx/fedlora"):
        cmd = cmd.replace(outside, f"{work}{outside}")
    cmd = cmd.replace("8883", str(port))
    if cmd.startswith("fedlora broker-config") and "--port" not in cmd:
        cmd += f" --port {port}"
    return cmd


def reader_files(work: Path) -> None:
    """What a reader brings: a fleet naming the enrolled device, its profile, its data, and the
    files the pages show in full (docs/methods.md's ``half.yaml``)."""
    import json

    from fedlora_edge.core.data import generate_task

    (work / "my-fleet.yaml").write_text("devices:\n  - {id: pi5, profile: raspberry-pi-5}\n")
    shutil.copyfile(ROOT / "profiles" / "raspberry-pi-5.yaml", work / "pi5.yaml")
    rows = [{"prompt": ex.prompt, "response": ex.response} for t in ("add", "upper") for ex in generate_task(t, 16, 1)]
    for name in ("my-data.jsonl", "local.jsonl"):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    half = re.search(r"`half\.yaml`:\n\n```yaml\n(.*?)```", (ROOT / "docs" / "methods.md").read_text(), flags=re.S)
    if half:
        (work / "half.yaml").write_text(half.group(1))


def work_folder() -> Path:
    """A folder like the repository's root, that Mosquitto started as root (it then runs as user
    mosquitto) can enter, as a user's project folder: not under pytest's 0700 temporary root."""
    work = Path(tempfile.mkdtemp(prefix="fedlora-docs-", dir="/tmp"))
    work.chmod(0o755)
    for entry in ROOT.iterdir():
        if entry.name not in {"runs", ".git", "build", "broker", ".pytest_cache", ".hypothesis"}:
            (work / entry.name).symlink_to(entry)
    return work


def check_flags(cmd: str) -> None:
    """The program exists and takes every flag ``cmd`` gives it; a ``fedlora`` run's settings load."""
    if cmd.startswith("for "):
        m = re.match(r"for (\w+) in ([^;]+); do\n(.*)\ndone", cmd, flags=re.S)
        assert m, f"cannot read the loop `{cmd}`"
        for value in m[2].split():
            for inner in m[3].splitlines():
                check_flags(inner.strip().replace(f"${m[1]}", value))
        return
    words = shlex.split(cmd.rstrip("&").strip())
    while words and re.match(r"\w+=", words[0]):  # OMP_NUM_THREADS=1 ...
        words.pop(0)
    if words[:2] == [".", ".venv/bin/activate"]:
        words = words[3:]
    if words[:2] == ["bash", "scripts/run.sh"]:
        words = ["fedlora", "emulate", "--out", "runs/demo", *words[2:]]
    if words[0] == "python" and words[1].startswith("bench/"):
        script = ROOT / words[1]
        assert script.is_file(), f"`{cmd}`: no {words[1]}"
        source = script.read_text()
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert f'"{flag}"' in source, f"`{cmd}`: {words[1]} takes no {flag}"
        return
    assert words[0] == "fedlora", f"`{cmd}`: no flags check for {words[0]}"
    from fedlora_edge.coordinator.cli import _config_from_args, build_parser

    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"`{cmd}`: fedlora refuses its arguments (see the message above)")
    if words[1] in ("simulate", "compare", "emulate", "coordinator", "plan"):
        _config_from_args(args)


@dataclass
class Started:
    proc: subprocess.Popen
    cmd: str
    kind: str
    log: Path


def run_page(page: str, slow: bool) -> None:
    work, port = work_folder(), free_port()
    env = {**os.environ, "HOME": str(work), "FEDLORA_REGISTRY": str(work / "registry"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    started: list[Started] = []
    current = None  # the command in the foreground
    limit = 3600 if slow else 900
    try:
        reader_files(work)
        for n, (line, written) in enumerate(commands(page)):
            rule = how(page, written)
            what = rule.tier(slow)
            if what is None:
                continue
            cmd = placed(written, work, port)
            if what == FLAGS:
                check_flags(cmd)
                continue
            cmd = what.replace("{cmd}", cmd).replace("{port}", str(port))
            if cmd.endswith("&"):  # the page starts it in the background: so does the test
                cmd = cmd[:-1].rstrip()
            log = work / f"command-{n:02d}.log"
            proc = subprocess.Popen(["bash", "-c", cmd], cwd=work, env=env, stdout=open(log, "wb"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
            where = f"{page}:{line} `{written}`" + (f" (run as `{cmd}`)" if cmd != written else "")
            if rule.kind == "fg":
                current = proc
                rc = _wait(proc, limit, started)
                if rc is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    pytest.fail(f"{where} did not end within {limit} s: {_tail(log)}")
                assert rc == 0, f"{where} exited {rc}: {_tail(log)}"
                if slow and rule.says is not None:
                    assert rule.says in log.read_text(errors="replace").split(), f"{where} did not say {rule.says}: " \
                        f"{_tail(log)}"
                continue
            started.append(Started(proc, where, rule.kind, log))
            if rule.kind == "server":
                _wait_listening(port, proc, log, where)
        for s in started:
            if s.kind == "bg":
                try:
                    rc = s.proc.wait(limit)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{s.cmd} did not end within {limit} s: {_tail(s.log)}")
                assert rc == 0, f"{s.cmd} exited {rc}: {_tail(s.log)}"
    finally:
        for proc in [current] * (current is not None) + [s.proc for s in started]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


def _wait(proc: subprocess.Popen, limit: float, started: list[Started]) -> int | None:
    """``proc``'s exit status, or None past ``limit`` seconds; fails at once when a process started
    in the background before it ends with an error (a device would wait for its coordinator for ever)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            return rc
        for s in started:
            if s.proc.poll() not in (None, 0):
                pytest.fail(f"{s.cmd} exited {s.proc.returncode}: {_tail(s.log)}")
        time.sleep(0.5)
    return None


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, where: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{where} exited {proc.returncode}: {_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{where}: nothing listens on port {port} after 30 s: {_tail(log)}")


def _needs(page: str) -> None:
    text = " ".join(c for _, c in commands(page))
    if "mosquitto -c" in text:
        from mqttkit import mosquitto_exe

        mosquitto_exe()  # skips where Mosquitto is not installed (fails in CI: FEDLORA_REQUIRE_MOSQUITTO=1)


# ------------------------------------------------------------------------------------------- the tests


def test_every_command_of_the_pages_has_a_way_to_be_checked():
    for page in PAGES:
        for _, cmd in commands(page):
            rule = how(page, cmd)
            for what in (rule.default, rule.tier(True)):
                assert what is not None or rule.why, f"{page}: `{cmd}` is not run and HOW does not say why"


def test_commands_are_read_as_a_shell_reads_them():
    cmds = [c for _, c in commands("docs/security.md")]
    issue = next(c for c in cmds if c.startswith("python -c"))
    assert "\\" not in issue and "issue_server(load_ca(" in issue and issue.endswith("'server.key')\"")
    assert "fedlora devices init --registry /srv/fedlora/registry" in cmds  # its comment dropped
    loop = next(c for _, c in commands("docs/results.md") if c.startswith("for "))
    assert loop.endswith("done") and "fedlora simulate --method $m" in loop


@pytest.mark.integration
@pytest.mark.parametrize("page", [p for p in PAGES if p not in ("docs/results.md", "docs/deploy.md")])
def test_the_page_runs_as_written(page):
    """The default tier: every command as written, or with the tiny model where it takes minutes."""
    _needs(page)
    run_page(page, slow=False)


@pytest.mark.parametrize("page", ["docs/results.md", "docs/deploy.md"])
def test_the_measurements_commands_take_their_flags(page):
    """The benchmarks' commands: every program exists and takes every flag the page gives it."""
    run_page(page, slow=False)


@pytest.mark.slow
def test_the_readme_runs_as_written_with_smollm2():
    """The README's own runs with SmolLM2 (quick variants where a run takes minutes), and the
    exports and generation from the adapter they make."""
    _needs("README.md")
    run_page("README.md", slow=True)
