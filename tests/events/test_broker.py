"""The embedded nats-server and the stream setup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from nats.js.api import StorageType

from tollway.events.broker import (
    EmbeddedNats,
    NatsUnavailable,
    _alive,
    connect,
    ensure_kv,
    ensure_stream,
    nats_server_binary,
    read_runtime_file,
    stream_config,
)


def test_the_binary_comes_from_the_package() -> None:
    path = nats_server_binary()
    assert os.access(path, os.X_OK)


def test_embedded_server_on_loopback_with_its_store_in_the_data_dir(tmp_path: Path) -> None:
    srv = EmbeddedNats(tmp_path / "data")
    url = srv.start()
    try:
        assert url.startswith("nats://127.0.0.1:")
        assert read_runtime_file(tmp_path / "data") == url
        assert (tmp_path / "data" / "jetstream").is_dir()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            assert s.recv(4) == b"INFO"
        # A second server on the same store would corrupt it: refused, naming the first.
        with pytest.raises(NatsUnavailable, match="in use by another tollway process"):
            EmbeddedNats(tmp_path / "data").start()
    finally:
        srv.stop()
    assert read_runtime_file(tmp_path / "data") is None
    assert srv.proc is None


_GATEWAY = """
import sys, time
from tollway.events.broker import EmbeddedNats
srv = EmbeddedNats(sys.argv[1], die_with_parent=sys.argv[2] == "1")
print(srv.start(), srv.proc_pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("dies_with_it", [True, False], ids=["linux", "no-pdeathsig"])
def test_a_gateway_killed_with_sigkill_leaves_no_server_in_the_way(tmp_path: Path,
                                                                    dies_with_it: bool) -> None:
    """A restart on the data folder of a gateway killed with SIGKILL starts its own server
    on the same store: the old one has stopped, is stopping, or (no parent-death signal,
    as on macOS) is found running and stopped."""
    data = tmp_path / "data"
    with subprocess.Popen([sys.executable, "-c", _GATEWAY, str(data), "1" if dies_with_it
                           else "0"], stdout=subprocess.PIPE, text=True) as gw:
        assert gw.stdout is not None
        _url, pid = gw.stdout.readline().split()
        gw.kill()
        gw.wait()
    old = int(pid)
    if not dies_with_it:
        assert _alive(old), "the orphan outlived its gateway"
    srv = EmbeddedNats(data)
    try:
        assert srv.start()
        assert not _alive(old), "the old server is gone"
        assert read_runtime_file(data) == srv.url
    finally:
        srv.stop()


async def test_stream_and_bucket_are_created_then_updated(nats_server: EmbeddedNats) -> None:
    nc = await connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, stream_config(duplicate_window_s=180))
        info = await js.stream_info("TOLLWAY")
        assert info.config.subjects == ["tollway.>"]
        assert info.config.storage == StorageType.FILE
        assert info.config.duplicate_window == 180
        await ensure_stream(js, stream_config(duplicate_window_s=600))  # idempotent + update
        assert (await js.stream_info("TOLLWAY")).config.duplicate_window == 600
        kv = await ensure_kv(js)
        await kv.put("k", b"v")
        assert (await (await ensure_kv(js)).get("k")).value == b"v"
    finally:
        await nc.close()


async def test_a_duplicate_msg_id_is_stored_once(nc: object) -> None:
    from nats.aio.client import Client

    assert isinstance(nc, Client)
    js = nc.jetstream()
    a = await js.publish("tollway.call.completed.x", b"{}", headers={"Nats-Msg-Id": "e1"})
    b = await js.publish("tollway.call.completed.x", b"{}", headers={"Nats-Msg-Id": "e1"})
    assert not a.duplicate and b.duplicate and a.seq == b.seq
