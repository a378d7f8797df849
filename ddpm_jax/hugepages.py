"""Transparent huge pages for glibc's large allocations, chosen before the process starts.

XLA:CPU allocates a step's buffers afresh on every call: about 1.3 GB for DDPM's CIFAR-10 network
at batch 16. glibc serves allocations that large with mmap and gives them back on free, so each step
faults all of it in again, 4 KiB at a time: 320,000 page faults, about 14% of the step on a 2-core
EPYC. The tunable glibc.malloc.hugetlb=1 (glibc 2.35+) has malloc advise transparent huge pages for
those mappings, which takes the faults down to about 1,200 per step. glibc reads its tunables only
when a process starts, so the command-line entry points call `reexec_with_hugepages()` first, which
starts the same command again, once, with the tunable set. On a GPU or TPU the large buffers live
in device memory, so little changes there (not measured). A user who sets glibc.malloc.hugetlb in
GLIBC_TUNABLES themselves (0 to turn it off) is left alone.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"), None if unknown."""
    try:
        with open(path) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def hugetlb_tunables(environ: Mapping[str, str], libc: tuple[str, str],
                     thp: str | None) -> str | None:
    """The GLIBC_TUNABLES value to start again with, or None where that would change nothing: a
    libc other than glibc 2.35+ (musl, macOS), huge pages turned off in the kernel, or the tunable
    already set by the user. Tunables the user set stay as they were."""
    name, version = libc
    if name != "glibc" or tuple(int(v) for v in re.findall(r"\d+", version)[:2]) < (2, 35):
        return None
    if thp == "never":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=")[0] == TUNABLE for item in current.split(":")):
        return None
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command with glibc.malloc.hugetlb=1 where that helps;
    returns where it does not. Call it first, before jax is imported (it costs an interpreter
    start, not a jax import)."""
    value = hugetlb_tunables(os.environ, platform.libc_ver(), thp_mode())
    if value is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps the interpreter's own options (-m, -X, -W) as well as the command's.
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execve(sys.executable, argv, {**os.environ, "GLIBC_TUNABLES": value})
    except OSError as e:  # nothing is lost: this process goes on without huge pages
        print(f"warning: could not restart with {TUNABLE}=1 ({e}); continuing without it",
              file=sys.stderr)
