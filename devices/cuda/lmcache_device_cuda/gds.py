"""GPUDirect Storage through cuFile (``cuda.bindings.cufile``), an optional capability.

Three outcomes, each with its reason:

- ``gds``: the nvidia-fs driver is loaded and cuFile opened: file <-> GPU memory
  by DMA, no host bounce. Only then is ``capabilities.direct_storage`` True.
- ``compat``: cuFile opened without nvidia-fs (its compatibility mode): the same
  API works, but cuFile moves the bytes through host memory with POSIX I/O.
- ``none``: cuda-bindings or libcufile is missing, or cuFile refused to open.

:class:`GDSFile` reads into and writes from CUDA tensors at file offsets.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

NVFS_PROC = "/proc/driver/nvidia-fs/stats"


@dataclass(frozen=True)
class GDSStatus:
    """What direct storage this host offers, and why not more."""

    mode: str  # "gds" | "compat" | "none"
    reason: str
    version: str = ""
    directory: str = ""  # where a probe file registered (cuFile support depends on the filesystem)

    @property
    def usable(self) -> bool:
        return self.mode in ("gds", "compat")

    @property
    def direct(self) -> bool:
        return self.mode == "gds"


_LOCK = threading.Lock()
_STATUS: GDSStatus | None = None


def _cufile() -> Any:
    from cuda.bindings import cufile

    return cufile


def nvidia_fs_loaded() -> bool:
    return os.path.exists(NVFS_PROC) or any(n.startswith("nvidia-fs") for n in _dev_names())


def _dev_names() -> list[str]:
    try:
        return os.listdir("/dev")
    except OSError:
        return []


def _compat_config() -> None:
    """Without an explicit cuFile config, point cuFile at one that allows compatibility mode
    and logs to a temporary folder (its default writes ``cufile.log`` into the cwd)."""
    if os.environ.get("CUFILE_ENV_PATH_JSON") or os.path.exists("/etc/cufile.json"):
        return
    d = tempfile.mkdtemp(prefix="lmcache-cufile-")
    path = os.path.join(d, "cufile.json")
    with open(path, "w") as f:
        json.dump({"logging": {"dir": d, "level": "ERROR"},
                   "properties": {"allow_compat_mode": True, "use_poll_mode": False}}, f)
    os.environ["CUFILE_ENV_PATH_JSON"] = path


def _probe_register(cufile: Any, directory: str | None = None) -> str:
    """Register a scratch file with cuFile; '' on success, else the error."""
    fd = -1
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix="lmcache-gds-probe-", delete=True) as tmp:
            try:
                fd = os.open(tmp.name, os.O_RDWR | os.O_DIRECT)
            except OSError:
                fd = os.open(tmp.name, os.O_RDWR)
            descr = cufile.Descr()
            descr.type = cufile.FileHandleType.OPAQUE_FD
            descr.handle.fd = fd
            descr.fs_ops = 0
            handle = cufile.handle_register(descr.ptr)
            cufile.handle_deregister(handle)
        return ""
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    finally:
        if fd >= 0:
            os.close(fd)


def status(open_driver: bool = True) -> GDSStatus:
    """Probe once per process: import cuFile's bindings, open its driver, register a file."""
    global _STATUS
    with _LOCK:
        if _STATUS is not None:
            return _STATUS
        try:
            cufile = _cufile()
        except Exception as exc:  # noqa: BLE001 - ImportError, or a missing libcufile
            return GDSStatus("none", f"cuda.bindings.cufile is not importable ({type(exc).__name__}: {exc}); "
                                     'install it with: pip install "lmcache-device-cuda[gds]"')
        if not open_driver:
            return GDSStatus("none", "cuFile driver not opened yet")
        _compat_config()
        try:
            version = str(cufile.get_version())
        except Exception:  # noqa: BLE001
            version = ""
        try:
            cufile.driver_open()
        except Exception as exc:  # noqa: BLE001
            _STATUS = GDSStatus("none", f"cuFile driver_open failed: {type(exc).__name__}: {exc}", version)
            return _STATUS
        nvfs = nvidia_fs_loaded()
        errors = []
        where = ""
        for d in dict.fromkeys([os.environ.get("LMCACHE_GDS_DIR") or tempfile.gettempdir(), os.getcwd()]):
            err = _probe_register(cufile, d)
            if not err:
                where = d
                break
            errors.append(f"{d}: {err}")
        if not where:
            why = "nvidia-fs driver not loaded and " if not nvfs else ""
            _STATUS = GDSStatus("none", f"{why}cuFile cannot register files ({'; '.join(errors)})", version)
        elif nvfs:
            _STATUS = GDSStatus("gds", "cuFile opened with the nvidia-fs driver: file <-> GPU DMA", version, where)
        else:
            _STATUS = GDSStatus("compat", "nvidia-fs driver not loaded: cuFile runs in compatibility mode "
                                          "(POSIX I/O through a host bounce buffer)", version, where)
        return _STATUS


class GDSFile:
    """A file opened for cuFile reads and writes of CUDA tensors. Close it (or use ``with``)."""

    def __init__(self, path: str | os.PathLike[str], write: bool = False) -> None:
        st = status()
        if not st.usable:
            raise RuntimeError(f"GPUDirect Storage is not available: {st.reason}")
        self.cufile = _cufile()
        flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
        self.path = os.fspath(path)
        self.direct_io = True
        try:
            self.fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
        except OSError:  # tmpfs and some overlay filesystems refuse O_DIRECT: compat mode still works
            self.direct_io = False
            self.fd = os.open(self.path, flags, 0o644)
        try:
            self._descr = self.cufile.Descr()
            self._descr.type = self.cufile.FileHandleType.OPAQUE_FD
            self._descr.handle.fd = self.fd
            self._descr.fs_ops = 0
            self.handle = self.cufile.handle_register(self._descr.ptr)
        except Exception:
            os.close(self.fd)
            raise

    def read_into(self, t: "torch.Tensor", file_offset: int = 0) -> int:
        """Fill the contiguous CUDA tensor ``t`` from the file; returns the bytes read."""
        self._check(t)
        n = self.cufile.read(self.handle, t.data_ptr(), t.numel() * t.element_size(), file_offset, 0)
        return int(n)

    def write_from(self, t: "torch.Tensor", file_offset: int = 0) -> int:
        """Write the contiguous CUDA tensor ``t`` at ``file_offset``; returns the bytes written."""
        self._check(t)
        import torch

        torch.cuda.current_stream(t.device).synchronize()  # cuFile reads device memory directly
        n = self.cufile.write(self.handle, t.data_ptr(), t.numel() * t.element_size(), file_offset, 0)
        return int(n)

    @staticmethod
    def _check(t: "torch.Tensor") -> None:
        if t.device.type != "cuda" or not t.is_contiguous():
            raise ValueError(f"cuFile moves contiguous CUDA tensors; got {t.device}, contiguous={t.is_contiguous()}")

    def close(self) -> None:
        if getattr(self, "handle", None) is not None:
            try:
                self.cufile.handle_deregister(self.handle)
            finally:
                self.handle = None
                os.close(self.fd)

    def __enter__(self) -> "GDSFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
