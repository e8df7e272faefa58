"""Multi-host steps (`nnodes > 1`): rank 0 drives, the other ranks follow.

Every process runs the same jitted programs over one global mesh (multi-controller SPMD), so every
process must call its ModelRunner's `dispatch` and `collect` in the same order with the same
SchedulerOutputs: the host-built inputs then match on every rank. Rank 0 runs the scheduler; its
runner is wrapped in `LeaderRunner`, which sends each call to the followers before making it. A
follower (`run_follower`) builds the same runner and replays the calls until rank 0 says it is
shutting down. The calls between steps that change what every rank holds go the same way: sleep and
wake_up, new weights (sent as numpy arrays: a follower cannot read rank 0's devices, and a trainer
hands rank 0 whole weights; each rank then places its own shards), and LoRA adapters (read from
disk on rank 0 only, so the path need not exist on the other nodes).

A call that fails on rank 0 has already been sent, and the followers cannot take it back: their
runner state and device queue now hold a step that rank 0 lacks, so the next collective would
mismatch. Such a failure therefore ends the engine: rank 0 tells the followers, which exit with code
1, and every later step on rank 0 raises PeerLostError. A follower whose own call fails exits with
code 1 as well, which rank 0 sees as a closed connection.

Start-up: the connections open right after `jax.distributed.initialize`, before the weights load.
Until the engine runs (rank 0's LeaderRunner is built, a follower starts replaying), a peer's closed
connection ends the process at once with code 1, naming the lost rank and what this process was
doing (`startup_phase`): the others would otherwise wait for the lost rank in a start-up collective
(the KV cache's sizing, the warm-up) until JAX's heartbeat timeout (100 s), or for ever. Rank 0
failing in start-up tells the followers as it exits; a follower failing there exits at once.

Transport: one TCP connection from each follower to rank 0 on the port after `dist_init_addr`'s,
carrying length-prefixed pickles one way. A socket was chosen over jax.distributed's key-value store
because a peer's death shows at once as a closed connection (the store only has blocking reads with
timeouts, and keys would pile up per step), and because it keeps the order of messages by itself.
Like jax.distributed's own coordinator it trusts the cluster network: followers unpickle what rank 0
sends (rank 0 reads nothing but a rank number from them).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import pickle
import queue
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from jaxvllm.config import EngineArgs, split_host_port

logger = logging.getLogger(__name__)

_REPLICATED = ("sleep", "wake_up", "add_lora", "update_weights", "update_named_weights")
_BAD_INPUT = (ValueError, TypeError)
CONNECT_TIMEOUT_S = 300.0   # as jax.distributed.initialize's default: ranks start minutes apart
_LENGTH = struct.Struct("!Q")
_RANK = struct.Struct("!I")


class PeerLostError(RuntimeError):
    """A process of a multi-host engine is gone, or out of step with the others: the engine cannot
    continue."""


def step_port(args: EngineArgs) -> tuple[str, int]:
    host, port = split_host_port(args.dist_init_addr, "dist_init_addr")
    return host, port + 1


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    """The next message; None when the sender closed the connection."""
    head = _recv_exact(sock, _LENGTH.size)
    body = None if head is None else _recv_exact(sock, _LENGTH.unpack(head)[0])
    return None if body is None else pickle.loads(body)


class _Channel:
    """This process's connections to the other ranks (rank 0: one per follower; a follower: one to
    rank 0), from jax.distributed.initialize on. During start-up a lost peer ends this process at
    once; then the engine takes the channel over (`_take_channel`)."""

    def __init__(self, args: EngineArgs) -> None:
        self.rank = args.node_rank
        self.phase: Optional[str] = "starting"  # None once the engine runs
        self.leader: Optional[LeaderRunner] = None  # rank 0, once the engine runs
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # a follower's: rank 0's calls
        if self.rank == 0:
            self.socks = _accept_followers(args)
            for rank, sock in self.socks.items():
                threading.Thread(target=self._watch, args=(rank, sock), daemon=True,
                                 name=f"jaxvllm-follower-{rank}").start()
            atexit.register(self._at_exit)
        else:
            self.socks = {0: _connect_to_leader(args)}
            threading.Thread(target=_read_leader, args=(self,), daemon=True,
                             name="jaxvllm-leader").start()

    def during_startup(self) -> str:
        return "" if self.phase is None else f" during start-up, while this rank was {self.phase}"

    def _watch(self, rank: int, sock: socket.socket) -> None:
        """Followers never send after the handshake, so a read returns only when one is gone."""
        try:
            sock.recv(1)
        except OSError:
            pass
        lost = f"rank {rank} closed its connection (the process exited or was killed)"
        if during := self.during_startup():
            _exit_now(f"exiting: {lost}{during}")
        elif self.leader is not None:
            self.leader._follower_lost(lost)

    def _at_exit(self) -> None:
        """Rank 0 exits before its engine ran (a start-up error, Ctrl-C): the followers would wait
        for it in a start-up collective while it waited for them at JAX's shutdown barrier."""
        if self.phase is None:
            return
        reason = f"rank 0 failed to start (while {self.phase}; its log says why)"
        self.phase = None  # the followers exit now: their closing connections are no news
        for sock in self.socks.values():
            with contextlib.suppress(OSError):
                _send(sock, ("fail", reason))
        # JAX's own exit handler would wait at jax.distributed's shutdown barrier for the followers,
        # which exit without reaching it, until its heartbeat times out (100 s).
        _exit_now(f"exiting: {reason}")


_channel: Optional[_Channel] = None


def open_channel(args: EngineArgs) -> None:
    """Connects the ranks of a multi-host engine (nothing with one node, or when open already); to
    be called right after jax.distributed.initialize."""
    global _channel
    if args.nnodes > 1 and _channel is None:
        _channel = _Channel(args)


def startup_phase(phase: str) -> None:
    """Names what this process does next in start-up, for the message when a peer is lost then."""
    if _channel is not None:
        _channel.phase = phase


def _take_channel(args: EngineArgs, leader: Optional[LeaderRunner] = None) -> _Channel:
    """The channel, now the engine's: from here on a lost follower fails rank 0's steps
    (LeaderRunner) rather than ending the process at once; a follower's reader goes on as it was."""
    global _channel
    channel, _channel = _channel or _Channel(args), None
    channel.leader = leader  # before the phase ends: a follower lost meanwhile is not missed
    channel.phase = None
    return channel


class LeaderRunner:
    """Rank 0's ModelRunner: every dispatch and collect is first sent to the followers. Anything
    else reads through to the runner."""

    def __init__(self, runner: Any, args: EngineArgs) -> None:
        self._runner = runner
        self._lost: Optional[str] = None
        self._closed = False
        self._send_lock = threading.Lock()
        self._socks = dict(_take_channel(args, self).socks)
        # A step waiting on a collective with a dead follower would wait for step_timeout: the
        # runner checks this while it waits, so a closed connection fails the step at once.
        runner.peer_check = self.check
        atexit.register(self._at_exit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def _follower_lost(self, reason: str) -> None:
        if self._lost is None and not self._closed:
            self._lost = reason

    def check(self) -> None:
        if self._lost is not None:
            raise self._lost_error()
        if self._closed:  # alone, rank 0's steps would wait for the followers forever
            raise PeerLostError("multi-host engine: rank 0 has shut the followers down")

    def dispatch(self, scheduler_output: Any) -> Any:
        return self._call(("dispatch", scheduler_output),
                          lambda: self._runner.dispatch(scheduler_output))

    def set_grammar_bitmask(self, handle: Any, rows: Any) -> None:
        self._call(("grammar_bitmask", rows), lambda: self._runner.set_grammar_bitmask(handle, rows))

    def collect(self, handle: Any) -> Any:
        out = self._call(("collect",), lambda: self._runner.collect(handle))
        self.check()  # a follower lost during the step: its samples may be fine, its state is not
        return out

    # Calls between steps that change what every rank holds (weights, cache, adapters): each rank
    # makes them in the order rank 0 did. A ValueError or TypeError from one is bad input, found
    # before anything changed, and the same on every rank (they run the same code on the same
    # values): it reaches the caller and the engine goes on.
    def sleep(self, level: int) -> None:
        self._replicate("sleep", level)

    def wake_up(self, tags: Any) -> None:
        self._replicate("wake_up", tags)

    def add_lora(self, lora_id: int, path: str, adapter: Any) -> None:
        self._replicate("add_lora", lora_id, path, adapter)

    def update_weights(self, params: Any) -> None:
        self._replicate("update_weights", _on_host(params))

    def update_named_weights(self, named: dict[str, Any]) -> None:
        self._replicate("update_named_weights", _on_host(named))

    def _replicate(self, name: str, *args: Any) -> None:
        self._call((name, *args), lambda: getattr(self._runner, name)(*args), _BAD_INPUT)

    def _call(self, msg: tuple, run: Callable[[], Any], passes: tuple = ()) -> Any:
        """Sends `msg` to the followers, then makes the same call here. An exception of a type in
        `passes` is raised as it is; any other ends the engine."""
        self.check()
        try:
            with self._send_lock:  # calls come from the engine's thread and a front's (add_lora)
                for rank, sock in self._socks.items():
                    try:
                        _send(sock, msg)
                    except OSError as e:
                        self._lost = f"sending to rank {rank} failed ({e})"
                        self.check()
            return run()
        except passes:
            raise
        except BaseException as e:
            # Followers that got the call have made it and cannot take it back: rank 0 is out of
            # step with them for good.
            self._fail(f"rank 0's {msg[0]} failed after the other ranks had started it "
                       f"({type(e).__name__}: {e})")
            if isinstance(e, PeerLostError) or not isinstance(e, Exception):
                raise  # a lost peer says so already; Ctrl-C and the like stay what they are
            raise self._lost_error() from e

    def _lost_error(self) -> PeerLostError:
        return PeerLostError(f"multi-host engine: {self._lost}; the engine cannot continue")

    def _fail(self, reason: str) -> None:
        """Ends the followers (code 1) and every later step of this engine."""
        if self._lost is None:
            self._lost = reason
        socks, self._socks = self._socks, {}
        for sock in socks.values():
            with contextlib.suppress(OSError):
                _send(sock, ("fail", self._lost))
            sock.close()

    def close(self) -> None:
        """Tells the followers to exit (code 0); idempotent."""
        self._closed = True
        socks, self._socks = self._socks, {}
        for sock in socks.values():
            try:
                _send(sock, ("shutdown",))
                sock.close()
            except OSError:
                pass

    def _at_exit(self) -> None:
        if self._lost is None:
            self.close()
            return
        # JAX's own exit handler would wait at jax.distributed's shutdown barrier for the lost rank
        # until its heartbeat times out (100 s), then abort: exit now, non-zero, instead.
        _exit_now(f"exiting: {self._lost}")


def _on_host(weights: Any) -> Any:
    """The weights rank 0 was given, as numpy arrays for the followers (they cannot read rank 0's
    devices)."""
    def leaf(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise ValueError("with nnodes > 1, update_weights takes weights that rank 0 holds "
                             "(numpy arrays, or arrays on rank 0's own devices) and sends them to "
                             "the other ranks; got an array spread over several processes")
        return np.asarray(x)
    return jax.tree.map(leaf, weights)


def _exit_now(reason: str, exc: Optional[BaseException] = None) -> None:
    logger.error("multi-host engine %s", reason, exc_info=exc)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _accept_followers(args: EngineArgs) -> dict[int, socket.socket]:
    _, port = step_port(args)
    want = set(range(1, args.nnodes))
    socks: dict[int, socket.socket] = {}
    with socket.create_server(("", port)) as server:
        server.settimeout(CONNECT_TIMEOUT_S)
        logger.info("Waiting for ranks %s on port %d", sorted(want), port)
        while want - set(socks):
            try:
                sock, _ = server.accept()
            except socket.timeout:
                raise PeerLostError(f"ranks {sorted(want - set(socks))} did not connect to port "
                                    f"{port} within {CONNECT_TIMEOUT_S:g} s") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(CONNECT_TIMEOUT_S)
            head = _recv_exact(sock, _RANK.size)
            rank = None if head is None else _RANK.unpack(head)[0]
            if rank not in want or rank in socks:
                sock.close()
                raise PeerLostError(f"a follower announced rank {rank}; expected one of "
                                    f"{sorted(want - set(socks))}")
            sock.settimeout(None)
            socks[rank] = sock
    return socks


def _connect_to_leader(args: EngineArgs) -> socket.socket:
    addr = step_port(args)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:  # rank 0 listens once it has joined jax.distributed, maybe a moment after this rank
        try:
            sock = socket.create_connection(addr, timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise PeerLostError(f"rank 0 did not accept at {addr[0]}:{addr[1]} within "
                                    f"{CONNECT_TIMEOUT_S:g} s") from None
            time.sleep(0.5)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_RANK.pack(args.node_rank))
    return sock


def run_follower(args: EngineArgs) -> int:
    """A rank > 0: build the same runner as rank 0, then replay its calls. Returns 0 when rank 0
    shuts down; when rank 0 reports a failure or disappears without saying so, or start-up or a
    call fails here, exits the process with code 1 at once (JAX's exit handler would wait for rank
    0 at its shutdown barrier). Batch limits left unset are resolved as rank 0's offline engine
    resolves them; a server's rank 0 fills them in before (the serve command does here too)."""
    from jaxvllm.engine.setup import build_runner, load
    if args.node_rank == 0:
        raise ValueError("run_follower is for ranks > 0; rank 0 runs the engine")
    try:
        runner, _, _ = build_runner(args, load(args))  # load connects to rank 0 first
        startup_phase("compiling")
        if args.compiles_at_start():
            runner.warmup(progress=False)  # rank 0 compiles and warms up the same programs
        channel = _take_channel(args)
        logger.info("Rank %d following rank 0", args.node_rank)
        return _replay(runner, channel.inbox, args.node_rank)
    except BaseException as e:  # noqa: BLE001 (Ctrl-C too: JAX's exit would wait for rank 0)
        _exit_now(f"rank {args.node_rank} stops: {type(e).__name__}: {e}", e)
        raise  # not reached


def _replay(runner: Any, inbox: queue.SimpleQueue, rank: int) -> int:
    pending: collections.deque = collections.deque()  # dispatched steps, collected in order
    while True:
        msg = inbox.get()
        if msg[0] == "dispatch":
            handle = runner.dispatch(msg[1])
            if handle is not None:
                pending.append(handle)
        elif msg[0] == "grammar_bitmask":  # for the oldest step still waiting for its masks
            runner.set_grammar_bitmask(next(h for h in pending if h.needs_grammar_bitmask), msg[1])
        elif msg[0] == "collect":
            runner.collect(pending.popleft())
        elif msg[0] in _REPLICATED:
            try:
                getattr(runner, msg[0])(*msg[1:])
            except _BAD_INPUT as e:  # rank 0 met the same and told its caller (LeaderRunner)
                logger.info("Rank 0's %s was refused here too: %s", msg[0], e)
        elif msg[0] == "shutdown":
            logger.info("Rank 0 shut down; rank %d exits", rank)
            return 0
        else:
            raise RuntimeError(f"unknown message from rank 0: {msg[0]!r}")


def _read_leader(channel: _Channel) -> None:
    """Passes rank 0's calls to the replay loop, from start-up on (calls sent meanwhile wait for
    it). Off that loop, so that rank 0's failure or death ends this rank even while it waits for a
    collective rank 0 never joins: in start-up, or in a replayed call (as a dispatch may, on the
    device queue)."""
    try:
        while (msg := _recv(channel.socks[0])) is not None and msg[0] != "fail":
            channel.inbox.put(msg)
            if msg[0] == "shutdown":
                return
        reason = ("rank 0 closed its connection without shutting down" if msg is None
                  else f"rank 0 stopped the engine: {msg[1]}")
    except Exception as e:  # noqa: BLE001 (a broken channel ends this rank the same way)
        reason = f"reading from rank 0 failed ({type(e).__name__}: {e})"
    _exit_now(f"rank {channel.rank} stops: {reason}{channel.during_startup()}")
