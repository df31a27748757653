"""A bad ``--scheduler`` address: one ConfigError line within the connect timeout, never a hang or a traceback.

The hostile peers are local servers on 127.0.0.1, each in a thread of this test, closed at its end.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsi_dala.core.errors import ConfigError
from wsi_dala.inference.cluster import SCHEMES, check_address, connect

TIMEOUT_S = 3.0
SLACK_S = 4.0  # the probe's grace, thread start-up, importing distributed


@contextlib.contextmanager
def _raw_server(greeting: bytes | None) -> Iterator[int]:
    """A TCP server on a free loopback port: it accepts, sends ``greeting`` (if any) and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop, accepted = threading.Event(), []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted.append(conn)
            if greeting:
                conn.sendall(greeting)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _refused(address: str, *fragments: str) -> tuple[str, float]:
    """Connect in a thread, so that a hang fails the test instead of hanging it."""
    outcome: list[BaseException | object] = []

    def attempt() -> None:
        try:
            outcome.append(connect(address, TIMEOUT_S))
        except BaseException as exc:
            outcome.append(exc)

    started = time.perf_counter()
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S + SLACK_S + 10)
    elapsed = time.perf_counter() - started
    assert outcome, f"connect({address!r}) still hangs after {elapsed:.0f} s"
    assert isinstance(outcome[0], ConfigError), repr(outcome[0])
    message = str(outcome[0])
    assert "\n" not in message, message
    assert message.startswith(f"{address}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert elapsed < TIMEOUT_S + SLACK_S, (elapsed, message)
    return message, elapsed


def test_a_port_that_accepts_and_never_answers_times_out():
    with _raw_server(None) as port:
        _, elapsed = _refused(f"tcp://127.0.0.1:{port}", "no Dask scheduler answered within 3 s", "handshake")
    assert elapsed >= TIMEOUT_S - 0.5  # it did wait for the handshake, as long as it was told


def test_an_http_server_is_not_a_scheduler():
    with _http_server() as port:
        _refused(f"tcp://127.0.0.1:{port}", "no Dask scheduler answered within 3 s")


def test_garbage_bytes_are_refused_without_memory_error():
    with _raw_server(b"\xff" * 64) as port:
        message, _ = _refused(f"tcp://127.0.0.1:{port}", "not a Dask scheduler (")
    assert "Traceback" not in message


def test_an_http_reply_is_refused_without_memory_error():
    # Its first 8 bytes read as a frame length of exbibytes: refused before Dask's reader allocates it.
    with _raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as port:
        message, _ = _refused(f"tcp://127.0.0.1:{port}", "not a Dask scheduler (", "MiB, not a Dask handshake")
    assert "MemoryError" not in message


def test_a_peer_announcing_a_huge_frame_is_refused_before_it_is_read():
    """A hostile "scheduler" announcing a 3 GiB first frame, then streaming bytes: refused at its header, the
    process's peak memory not raised by anything like the frame."""
    import resource
    import struct

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with _raw_server(struct.pack("Q", 3 * 2**30) + b"\0" * (1 << 20)) as port:
        _refused(f"tcp://127.0.0.1:{port}", "announces 3072 MiB")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: far below 3 GiB


def test_nothing_listening_times_out():
    # The last attempt's error is named: "Connection refused", or a TimeoutError when the deadline cut it.
    _, elapsed = _refused(f"tcp://127.0.0.1:{_closed_port()}", "no Dask scheduler answered within 3 s (no connection;")
    assert elapsed >= TIMEOUT_S - 0.5  # Dask retries a refused connect: the scheduler may be starting


@pytest.mark.parametrize("address", ["foo://x", "http://127.0.0.1:8786", "tcp://", "localhost", "tcp://h:99999"])
def test_bad_addresses_are_refused_before_any_network_activity(address, monkeypatch):
    import distributed.comm

    def no_network(*args, **kwargs):
        raise AssertionError("connected")

    monkeypatch.setattr(distributed.comm, "connect", no_network)
    message, elapsed = _refused(address)
    assert elapsed < 2.0
    if "://" in address and address.split("://")[0] not in SCHEMES:
        assert "accepted: tcp://, tls://, inproc://, ucx://, ws://, wss:// or a bare host:port" in message


def test_accepted_address_forms():
    assert check_address("tcp://10.0.0.1:8786") == "tcp"
    assert check_address("10.0.0.1:8786") == "tcp"
    assert check_address("[::1]:8786") == "tcp"
    assert check_address("tls://scheduler.example:8786") == "tls"
    assert check_address("ws://scheduler.example:8786") == "ws"
    assert check_address("inproc://192.0.2.2/1/2") == "inproc"


def test_a_local_cluster_connects():
    from distributed import LocalCluster

    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster,
        connect(cluster.scheduler_address, 10) as client,
    ):
        assert client.submit(lambda x: x + 1, 41).result(timeout=10) == 42


def test_a_tcp_cluster_connects_through_the_probe_and_a_worker_is_refused():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, protocol="tcp://", dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        with connect(address, 10) as client:
            assert client.submit(lambda x: x * 2, 21).result(timeout=10) == 42
        with connect(address.removeprefix("tcp://"), 10) as client:  # bare host:port is tcp
            assert client.submit(lambda x: x * 2, 21).result(timeout=10) == 42
        worker = next(iter(cluster.scheduler_info["workers"]))
        _refused(worker, "not a Dask scheduler (a Dask Worker answered)")


def test_the_cli_prints_one_line_and_exits_2(tmp_path: Path):
    from wsi_dala.model import write_untrained_checkpoint
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "slide.svs", SyntheticSlideSpec(width=2048, height=1536, mpp=0.5, seed=1))
    checkpoint = tmp_path / "model.safetensors"
    write_untrained_checkpoint(
        checkpoint, "colour-reference", tile_size_px=64, mpp=1.0, class_names=("Non-tumor", "Tumor")
    )
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"scoring:\n  connect_timeout_s: {TIMEOUT_S:g}\n", encoding="utf-8")
    with _raw_server(None) as port:
        address = f"tcp://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "wsi_dala", "run", str(slide.path), "--model", str(checkpoint)]
        argv += ["--scheduler", address, "--out", str(tmp_path / "out"), "--config", str(config), "-q"]
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        elapsed = time.perf_counter() - started
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"wsi-dala: error: {address}: no Dask scheduler answered within 3 s"), lines[0]
    assert elapsed < 60


def test_a_local_process_cluster_leaves_our_thread_settings_alone(monkeypatch):
    """distributed writes OMP/MKL/OPENBLAS_NUM_THREADS=1 into the creating process unless told not to: every
    process started afterwards (a batch's slides, CLI runs) would then run torch on one thread."""
    import os

    from distributed import Client, LocalCluster

    from wsi_dala.inference.cluster import THREAD_VARIABLES, our_environ_kept, worker_threads_environ

    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with our_environ_kept():
        cluster = LocalCluster(n_workers=1, processes=True, dashboard_address=None, env=worker_threads_environ(2))
    with cluster, Client(cluster) as client:
        in_worker = client.submit(lambda: {n: os.environ.get(n) for n in THREAD_VARIABLES}).result(timeout=60)
    assert in_worker == dict.fromkeys(THREAD_VARIABLES, "2")
    assert not any(name in os.environ for name in THREAD_VARIABLES)
