"""Connecting to a ``dask.distributed`` scheduler: a deadline, and one clear line when it fails.

``distributed.Client(address, timeout=...)`` bounds only the TCP connect. Its handshake read has no
deadline, so a port that accepts and never answers (or an HTTP server, which waits for a request line
that never comes) hangs it for good, and a peer that answers garbage makes it read a crazy frame length
(``MemoryError: Unable to allocate 3.07 EiB``, ``ValueError``). An unknown scheme is a ``ValueError``
traceback. So ``connect`` checks the address before any network activity, then probes it in a throw-away
event loop under ``asyncio.wait_for``: Dask's own connect and handshake, then an ``identity`` call that
must come back from a ``Scheduler``. Only a verified address is handed to ``Client``.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from wsi_dala.core.errors import ConfigError

if TYPE_CHECKING:
    from distributed import Client
    from distributed.security import Security

    from wsi_dala.core.config import ScoringConfig

# The schemes dask.distributed can reach a scheduler over; a bare ``host:port`` means tcp.
SCHEMES = ("tcp", "tls", "inproc", "ucx", "ws", "wss")
_NEEDS_HOST_PORT = ("tcp", "tls", "ws", "wss")
_NEEDS_TLS = ("tls", "wss")
# The probe's connect phase gets exactly ``timeout_s`` (retried as Dask retries it); the whole probe gets
# this much more, so that a connect failure is reported as what it is, not as a handshake timeout.
_GRACE_S = 0.5


def connect(address: str, timeout_s: float) -> Client:
    """A client of the scheduler at ``address``; ``ConfigError`` (one line) if none answers in time.

    ``timeout_s`` bounds the connection and the Dask handshake; a peer that does not speak Dask, or is
    not a scheduler, is refused.
    """
    scheme = check_address(address)
    security = _security(address)
    if scheme in _NEEDS_TLS and security.get_connection_args("client").get("ssl_context") is None:
        raise ConfigError(f"{address}: {scheme}:// needs TLS certificates in the Dask config (distributed.comm.tls.*)")
    try:
        from distributed.comm import registry

        registry.get_backend(scheme).get_connector()
    except Exception as exc:  # e.g. ucx:// without distributed-ucxx
        raise ConfigError(f"{address}: {scheme}:// is not available here ({_cause(exc)})") from exc
    if scheme != "inproc":  # inproc:// is this process, nothing hostile: Client's own timeout is enough
        _probe(address, timeout_s, security)
    from distributed import Client

    try:
        return Client(address, timeout=timeout_s, security=security)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ConfigError(f"{address}: no Dask scheduler answered within {timeout_s:g} s ({_cause(exc)})") from exc
    except Exception as exc:  # anything else from the handshake: the peer is not a scheduler
        raise ConfigError(f"{address}: not a Dask scheduler ({_cause(exc)})") from exc


def check_address(address: str) -> str:
    """The scheme of a scheduler address (``tcp`` for a bare ``host:port``); ``ConfigError`` if unusable."""
    from distributed.comm.addressing import parse_address, parse_host_port

    accepted = ", ".join(f"{s}://" for s in SCHEMES) + " or a bare host:port"
    try:
        scheme, location = parse_address(address)
    except (TypeError, ValueError):
        scheme, location = "", ""
    if scheme not in SCHEMES or not location:
        raise ConfigError(f"{address}: not a Dask scheduler address (accepted: {accepted})")
    if scheme in _NEEDS_HOST_PORT:
        try:
            _, port = parse_host_port(location.split("/", 1)[0])
        except ValueError:
            port = -1
        if not 0 < port < 65536:
            raise ConfigError(f"{address}: a {scheme}:// scheduler address needs host:port (port 1-65535)")
    return scheme


def _security(address: str) -> Security:
    """The TLS settings Client would use: the configured security loader's, else the Dask config's."""
    import dask.config
    from distributed.security import Security
    from distributed.utils import import_term

    loader = dask.config.get("distributed.client.security-loader", None)
    if loader:
        try:
            security = import_term(loader)({"address": address})
        except Exception as exc:  # user code named in the Dask config
            raise ConfigError(f"distributed.client.security-loader {loader}: {_cause(exc)}") from exc
        if security is not None:
            return security
    return Security()


def _probe(address: str, timeout_s: float, security: Security) -> None:
    """Dask's connect + handshake + ``identity``, under a deadline, in a loop of its own (the caller's
    thread may already run one)."""
    outcome: dict[str, BaseException | None] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(error=_probe_in_new_loop(address, timeout_s, security)),
        name="wsi-dala-scheduler-probe",
        daemon=True,
    )
    thread.start()
    thread.join(timeout_s + _GRACE_S + 5.0)  # wait_for already bounds it; this is only the last resort
    error = outcome["error"] if "error" in outcome else asyncio.TimeoutError()
    if error is None:
        return
    if isinstance(error, asyncio.TimeoutError):
        why = "connected, but nothing answered the Dask handshake"
    elif type(error) is OSError:  # Dask's "Timed out trying to connect", from the last attempt's error
        why = f"no connection; last attempt: {_cause(error.__cause__ or error)}"
    else:  # garbage, a crazy frame length, a closed connection or TLS failure mid-handshake, not a scheduler
        raise ConfigError(f"{address}: not a Dask scheduler ({_cause(error)})") from error
    raise ConfigError(f"{address}: no Dask scheduler answered within {timeout_s:g} s ({why})") from error


def _probe_in_new_loop(address: str, timeout_s: float, security: Security) -> BaseException | None:
    try:
        asyncio.run(asyncio.wait_for(_identify(address, timeout_s, security), timeout_s + _GRACE_S))
    except Exception as exc:  # MemoryError, ValueError, ... from garbage all mean "not Dask"
        return exc
    return None


MAX_HANDSHAKE_BYTES = 1 << 20  # a scheduler's first message is a few hundred bytes; more is not Dask


async def _first_message_size(address: str, timeout_s: float) -> None:
    """Read, on a plain TCP connection, the frame lengths of the first message the peer sends (a Dask peer
    sends its handshake at once) and refuse one over MAX_HANDSHAKE_BYTES before anything is allocated for
    it: Dask's own reader allocates whatever length a peer announces (a hostile peer streaming a 3 GiB frame
    held 4 GB of memory within the deadline)."""
    import struct

    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.protocol.utils import unpack_frames

    host, port = parse_host_port(parse_address(address)[1])
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return  # no connection: Dask's own connect retries it and says so
    try:
        (total,) = struct.unpack("Q", await reader.readexactly(8))
        if total > MAX_HANDSHAKE_BYTES:
            raise _NotAScheduler(f"its first message announces {total / 2**20:.0f} MiB, not a Dask handshake")
        _, buffers = unpack_frames(await reader.readexactly(total), partial=True)
        if sum(buffers) > MAX_HANDSHAKE_BYTES:
            raise _NotAScheduler(f"its first message announces {sum(buffers) / 2**20:.0f} MiB of buffers")
    finally:
        writer.close()


async def _identify(address: str, timeout_s: float, security: Security) -> None:
    from distributed.comm import connect as comm_connect

    if address.startswith("tcp://") or "://" not in address:  # plain TCP: look at the size before Dask reads
        await _first_message_size(address if "://" in address else f"tcp://{address}", timeout_s)
    comm = await comm_connect(address, timeout=timeout_s, **security.get_connection_args("client"))
    try:
        await comm.write({"op": "identity", "reply": True})
        reply: Any = await comm.read()
        kind = reply.get("type") if isinstance(reply, dict) else None
        if kind != "Scheduler":
            raise _NotAScheduler(f"a Dask {kind} answered" if isinstance(kind, str) else f"it answered {reply!r:.60}")
        await comm.write({"op": "close", "reply": False})
    finally:
        comm.abort()


class _NotAScheduler(Exception):
    pass


def _cause(exc: BaseException) -> str:
    """One line: the message without Dask's ``in <TCPConnector object at 0x...>:`` prefix."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if text.startswith("in <") and ">: " in text:
        text = text.split(">: ", 1)[1]
    if isinstance(exc, _NotAScheduler):
        return text
    if not re.match(r"\w+(Error|Exception|Exit)\b", text):
        name = type(exc).__name__
        text = f"{name if name[:1].isupper() else type(exc).__module__ + '.' + name}: {text}"
    return text[:200]


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def worker_threads_environ(threads: int) -> dict[str, str]:
    """A worker process's thread counts, for ``LocalCluster(env=...)`` (set in the worker, not here)."""
    return {name: str(max(1, threads)) for name in THREAD_VARIABLES}


@contextmanager
def our_environ_kept() -> Iterator[None]:
    """Around a local cluster's creation: distributed's Nanny writes its ``pre-spawn-environ`` (OMP, MKL and
    OPENBLAS_NUM_THREADS = 1) into *this* process's ``os.environ`` and never restores it, so every process
    started afterwards (a slide's subprocess, a test's CLI run) ran torch on one thread: the demo test took
    300 s in the suite instead of 120. Only ``MALLOC_TRIM_THRESHOLD_`` is left pre-spawned (it must be set
    before a process starts); thread counts go to the workers through ``env=``."""
    import dask

    with dask.config.set({"distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536}}):
        yield


@contextmanager
def gpu_cluster(n_gpus: int) -> Iterator[Client]:
    """A client of a local cluster with one Dask worker per GPU (dask-cuda pins each worker to its own
    device through ``CUDA_VISIBLE_DEVICES``, so ``cuda`` in a worker is that worker's GPU)."""
    if n_gpus < 1:
        raise ConfigError("--devices all: no CUDA GPU is visible; use --devices one to score on the CPU")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ConfigError("--devices all needs dask-cuda: pip install 'wsi-dala[gpu]'") from exc
    from distributed import Client

    with our_environ_kept():
        cluster = LocalCUDACluster(n_workers=n_gpus, threads_per_worker=1)
    with cluster, Client(cluster) as client:
        yield client


@contextmanager
def scoring_client(config: ScoringConfig, client: Client | None = None) -> Iterator[Client | None]:
    """The one place a run gets its Dask client: the caller's (a batch's), a local GPU cluster for
    ``--devices all``, the scheduler at ``config.scheduler`` (connected before tiling, so a bad address fails
    at once), or None: Dask's local threaded scheduler. Scoring itself never connects."""
    if client is not None:
        yield client
    elif config.devices == "all":
        import torch

        with gpu_cluster(torch.cuda.device_count()) as own_client:
            yield own_client
    elif config.scheduler:
        with connect(config.scheduler, config.connect_timeout_s) as own_client:
            yield own_client
    else:
        yield None
