"""The huge-page restart of the command-line entry points (ddpm_jax/hugepages.py)."""

import os
import platform
import subprocess
import sys

import pytest

from ddpm_jax import hugepages

GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize("environ, libc, thp, expected", [
    ({}, GLIBC, "madvise", "glibc.malloc.hugetlb=1"),
    ({}, GLIBC, "always", "glibc.malloc.hugetlb=1"),
    ({}, GLIBC, None, "glibc.malloc.hugetlb=1"),  # mode unreadable: the tunable is harmless
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise",
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", None),  # the user's choice
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"}, GLIBC, "always", None),
    ({}, ("glibc", "2.35"), "madvise", "glibc.malloc.hugetlb=1"),
    ({}, ("glibc", "2.31"), "madvise", None),  # before the tunable existed
    ({}, ("", ""), "madvise", None),  # musl, macOS
    ({}, GLIBC, "never", None),  # huge pages off in the kernel
])
def test_hugetlb_tunables(environ, libc, thp, expected):
    assert hugepages.hugetlb_tunables(environ, libc, thp) == expected


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(path)) == "madvise"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_reexec_restarts_once_with_the_same_command():
    """The process starts again with the same interpreter options and arguments, the tunable set,
    and does not restart a second time; where the tunable would change nothing it goes straight on.
    """
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    code = ("import os, sys; from ddpm_jax import hugepages; "
            "print('start', sys.argv[1:], os.environ.get('GLIBC_TUNABLES'), flush=True); "
            "hugepages.reexec_with_hugepages(); print('after', os.environ.get('GLIBC_TUNABLES'))")
    result = subprocess.run([sys.executable, "-X", "utf8", "-c", code, "a", "--b=1"], env=env,
                            capture_output=True, text=True, check=True)
    value = hugepages.hugetlb_tunables(env, platform.libc_ver(), hugepages.thp_mode())
    if value is None:
        assert result.stdout.splitlines() == ["start ['a', '--b=1'] None", "after None"]
    else:
        assert result.stdout.splitlines() == [
            "start ['a', '--b=1'] None",
            f"start ['a', '--b=1'] {value}",
            f"after {value}",
        ]
