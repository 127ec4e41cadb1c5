"""Gaps of Paddle 3.3.1's collective and Fleet code on a CPU build (gloo), closed here and nowhere
else. Each patch names the symptom it removes and is applied only where that gap exists:

  gloo_group_stores   any gloo process group other than the global one (group_id != 0).
      Symptom: on 4 processes, `fleet.init` with groups that are proper subsets of the world fails
      or hangs (`gloo ... Connection refused`, `TIMEOUT`, `address.cc ... 136 vs 45`). Cause:
      `ProcessGroupGloo` runs gloo's full-mesh rendezvous on the shared global store with keys that
      carry no group prefix, so groups created one after another read each other's addresses.
      Fix: every such group gets a store of its own, hosted by the group's rank 0 (its address is
      published on the global store under a key that names the group).
  pipeline_device_id  CPU build with parallel.pp > 1.
      Symptom: `AttributeError: 'ParallelEnv' object has no attribute '_device_id'` when Fleet's
      pipeline starts. Fix: device id 0 (the CPU place ignores it).
  pipeline_p2p        CPU build with parallel.pp > 1.
      Symptom: `ProcessGroupGLOO does not support send with sync_op and use_calc_stream flag` at the
      first pipeline send. Fix: Fleet's `_send_on_calc_stream` / `_recv_on_calc_stream` send and
      receive with the process group's synchronous `send` / `recv`.

`apply` is called once by parallel/topology.py before `fleet.init`; it returns the names of the
patches it applied (also kept in `APPLIED`), so a run and a test can say what was changed.
"""

from __future__ import annotations

import os
import socket

PADDLE_VERSION = "3.3.1"
APPLIED: list[str] = []
_STORES: list = []  # a group's store must live as long as the group
_KEY = "paddle_ernie5/gloo_group/{gid}/store"


def needed(backend: str, pp: int, cuda: bool) -> list[str]:
    """The patches this run needs: gloo groups on gloo, the pipeline gaps on CPU with pp > 1."""
    names = []
    if backend == "gloo":
        names.append("gloo_group_stores")
    if not cuda and pp > 1:
        names += ["pipeline_device_id", "pipeline_p2p"]
    return names


def apply(backend: str, pp: int, cuda: bool) -> list[str]:
    """Apply what `needed` names (each at most once per process); returns what is now applied."""
    for name in needed(backend, pp, cuda):
        if name not in APPLIED:
            _PATCHES[name]()
            APPLIED.append(name)
    return list(APPLIED)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _patch_gloo_group_stores() -> None:
    from paddle.base import core
    from paddle.distributed import collective

    original = collective._new_process_group_impl

    def new_process_group_impl(
        backend, store, rank, world_size, group_name, pg_options, group_id=0, *args, **kwargs
    ):
        if backend != "gloo" or group_id == 0:
            return original(
                backend, store, rank, world_size, group_name, pg_options, group_id, *args, **kwargs
            )
        key = _KEY.format(gid=group_id)
        if rank == 0:
            host = os.environ.get("PADDLE_CURRENT_ENDPOINT", "127.0.0.1:0").rsplit(":", 1)[0]
            port = _free_port()
            # Published first: the hosting store's constructor waits until every member connected.
            store.set(key, f"{host}:{port}".encode())
            own = core.TCPStore(host, port, True, world_size)
        else:
            store.wait(key)
            host, port = bytes(store.get(key)).decode().rsplit(":", 1)
            own = core.TCPStore(host, int(port), False, world_size)
        _STORES.append(own)
        return core.ProcessGroupGloo.create(own, rank, world_size, group_id)

    new_process_group_impl.original = original
    collective._new_process_group_impl = new_process_group_impl


def _patch_pipeline_device_id() -> None:
    from paddle.distributed import ParallelEnv

    ParallelEnv._device_id = 0


def _patch_pipeline_p2p() -> None:
    from paddle.distributed.fleet.meta_parallel.pp_utils import p2p_communication as p2p

    def send(tensor, group, dst, nranks=1, rank_id=0):
        return group.process_group.send(tensor, group.get_group_rank(dst), True)

    def recv(tensor, group, src, nranks=1, rank_id=0):
        return group.process_group.recv(tensor, group.get_group_rank(src), True)

    send.original, recv.original = p2p._send_on_calc_stream, p2p._recv_on_calc_stream
    p2p._send_on_calc_stream, p2p._recv_on_calc_stream = send, recv


_PATCHES = {
    "gloo_group_stores": _patch_gloo_group_stores,
    "pipeline_device_id": _patch_pipeline_device_id,
    "pipeline_p2p": _patch_pipeline_p2p,
}
