"""The allocator setting the command-line tools make (`uniql_jax.host_memory`): freed weight-sized
arrays leave the resident set, which under glibc's default (moving) threshold they do not."""

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO

# 180 MiB of 3-MiB arrays freed after glibc's threshold was raised to 4 MiB by one freed 4-MiB
# array (what freeing one block's weights does); the MiB the resident set loses is printed
PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    if sys.argv[1] == "set":
        from uniql_jax.host_memory import return_freed_arrays_to_os
        assert return_freed_arrays_to_os()
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    a = np.ones((4 << 20) // 8); del a
    arrays = [np.ones((3 << 20) // 8) for _ in range(60)]
    pin = np.ones((2 << 20) // 8)  # allocated last, larger than any free chunk: the heap top stays in use
    before = rss_mb(); del arrays
    print(round(before - rss_mb()))
""")


def released_mb(mode: str, **env) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True)
    return int(proc.stdout.split()[-1])


def test_freed_arrays_leave_the_resident_set_only_with_the_setting():
    assert released_mb("keep") < 60  # glibc's default: the freed arrays stay resident
    assert released_mb("set") > 150  # each array was its own mapping, unmapped when freed


def test_a_threshold_the_user_chose_is_left_alone(monkeypatch):
    from uniql_jax import host_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 << 20))
    assert host_memory.return_freed_arrays_to_os() is False
