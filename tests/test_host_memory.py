"""keep_freed_memory: after it, memory a process frees is reused without faulting pages in again
(the training loop calls it on CPU, where each compiled call frees its temporary buffers)."""

import subprocess
import sys
import textwrap

# Allocates, touches and frees 64 MiB three times; prints the page faults of the last time.
SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from gptjax import host_memory

    if sys.argv[1] == "keep":
        assert host_memory.keep_freed_memory()

    def faults() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = np.ones(64 * 2**20 // 8)  # every page written
        del buffer
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults(), faults()
    print(faults())
    """
)


def _faults_of_a_reused_buffer(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


def test_freed_memory_is_reused_without_page_faults():
    # glibc's default: 64 MiB come from mmap and go back to the OS, so every time faults again
    # (at least 32 times: 2 MiB pages where the kernel backs it with huge pages)
    assert _faults_of_a_reused_buffer("default") >= 32
    assert _faults_of_a_reused_buffer("keep") < 8
