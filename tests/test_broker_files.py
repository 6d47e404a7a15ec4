"""`fedlora broker-config mosquitto` writes files the broker can read when it is started as the
README says: Mosquitto started as root runs as the user `mosquitto`, which must read the 0600
password file and TLS key and write the persistence folder."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from fedlora_edge.coordinator.brokerconf import hand_to_broker, mosquitto
from fedlora_edge.coordinator.registry import Registry

ROOT_WITH_USER = os.geteuid() == 0 and any(p.pw_name == "mosquitto" for p in pwd.getpwall())


def _config(folder: Path) -> Path:
    reg = Registry.create(folder / "registry")
    reg.add("pi5")
    reg.add_run("default")
    return mosquitto(reg, folder / "broker", port=_free_port(), bind="127.0.0.1", hosts=["localhost"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def reachable():
    """A folder the user mosquitto can enter (pytest's own temporary root is 0700)."""
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="fedlora-broker-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not ROOT_WITH_USER, reason="needs root and a mosquitto user (apt-get install mosquitto)")
def test_as_root_the_files_go_to_the_mosquitto_user_and_mosquitto_reads_them(reachable):
    from mqttkit import mosquitto_exe, wait_accepting

    conf = _config(reachable)
    lines = hand_to_broker(conf.parent)
    user = pwd.getpwnam("mosquitto")
    for name in ("passwd", "acl", "server.key", "server.pem", "ca.pem", "mosquitto.conf", "data"):
        st = (conf.parent / name).stat()
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid), name
    assert stat.S_IMODE((conf.parent / "passwd").stat().st_mode) == 0o600  # still secret, now the broker's
    assert lines == ["gave the files to user 'mosquitto' (Mosquitto started as root runs as it)"]
    # started as root with the generated file as it is (no `user root`): it drops to mosquitto and reads them
    port = int(next(ln for ln in conf.read_text().splitlines() if ln.startswith("listener")).split()[1])
    proc = subprocess.Popen([mosquitto_exe(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_accepting(port, proc, tls=True)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.skipif(not ROOT_WITH_USER, reason="needs root and a mosquitto user")
def test_a_folder_the_broker_cannot_enter_is_named_with_the_command_that_opens_it(reachable):
    shut = reachable / "private"
    shut.mkdir(mode=0o700)
    conf = _config(shut)
    lines = hand_to_broker(conf.parent)
    assert any(f"cannot enter {shut} (mode 700)" in ln and f"chmod o+x {shut}" in ln for ln in lines), lines


def test_not_as_root_nothing_changes_and_the_chown_is_printed(tmp_path, monkeypatch):
    if not any(p.pw_name == "mosquitto" for p in pwd.getpwall()):
        pytest.skip("no mosquitto user here")
    conf = _config(tmp_path)
    before = {p.name: p.stat().st_uid for p in conf.parent.iterdir()}
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    lines = hand_to_broker(conf.parent)
    assert lines == [f"to start Mosquitto as root (it then runs as user 'mosquitto'), first run "
                     f"`sudo chown -R mosquitto: {conf.parent}`"]
    assert {p.name: p.stat().st_uid for p in conf.parent.iterdir()} == before


def test_without_the_user_the_command_is_named(tmp_path):
    conf = _config(tmp_path)
    lines = hand_to_broker(conf.parent, user="no-such-user-fedlora")
    assert len(lines) == 1 and "there is none on this machine" in lines[0]
    assert f"chown -R no-such-user-fedlora: {conf.parent}" in lines[0]
