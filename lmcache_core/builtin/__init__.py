"""Built-in plugins, registered through the ``lmcache`` entry-point group like any other."""

from __future__ import annotations

from ..hookspecs import RegisterCodec, RegisterDevice, RegisterStorage, RegisterTransport, hookimpl


@hookimpl
def lmcache_register_devices(register: RegisterDevice) -> None:
    register("cpu", "lmcache_core.builtin.cpu:CPUDevice", requires=("torch",), extra="torch",
             description="Host CPU: torch gather/scatter for every layout")


@hookimpl
def lmcache_register_storage(register: RegisterStorage) -> None:
    register("memory", "lmcache_core.builtin.memory_store:MemoryStore", schemes=("memory", "cpu"),
             description="Process memory, LRU under a byte capacity, zero-copy")
    register("disk", "lmcache_core.builtin.disk_store:DiskStore", schemes=("disk", "file"),
             description="Local disk, LRU across restarts, atomic writes, O_DIRECT")
    register("p2p", "lmcache_core.p2p.store:P2PStore", schemes=("p2p",),
             description="Chunks other instances hold in memory (Redis/Valkey directory or rendezvous), verified")


@hookimpl
def lmcache_register_transports(register: RegisterTransport) -> None:
    register("local", "lmcache_core.builtin.local_transport:LocalTransport",
             description="In-process buffer copies (reference transport)")
    register("tcp", "lmcache_core.builtin.tcp_transport:TcpTransport",
             description="One-sided reads/writes of registered buffers over TCP, between processes or hosts")


@hookimpl
def lmcache_register_codecs(register: RegisterCodec) -> None:
    from ..codecs.registry import BUILTIN  # names and import paths only; nothing heavy is imported

    for spec in BUILTIN:
        register(spec.name, spec.factory, wire_id=spec.wire_id, extra=spec.extra, requires=spec.requires,
                 description=spec.description)
