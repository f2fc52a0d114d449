"""What runs on a device: the bundle format and its verification, the thread policy, latency
statistics, a loaded bundle (``run.py``, which every bundle carries), and safe installation of a
bundle archive (``install``). Imports only the standard library, numpy and the TVM runtime.
"""

from .install import MAX_ENTRIES, install_archive, install_path, replaceable
from .run import (
    BIND_ENV,
    FORMAT,
    MANIFEST,
    SUMS,
    THREADS_ENV,
    BundleError,
    Model,
    default_threads,
    execute,
    latency_stats,
    read_sums,
    sha256,
    threads_in_use,
    threads_pinned,
    use_default_threads,
    verify,
    write_sums,
)

__all__ = [
    "BIND_ENV", "FORMAT", "MANIFEST", "MAX_ENTRIES", "SUMS", "THREADS_ENV", "BundleError", "Model", "default_threads",
    "execute", "install_archive", "install_path", "latency_stats", "read_sums", "replaceable", "sha256",
    "threads_in_use", "threads_pinned", "use_default_threads", "verify", "write_sums",
]
