"""keep_freed_memory: after it, memory a process frees is reused without faulting pages in again
(the training loop calls it on CPU, where each compiled call frees its temporary buffers);
run_calls_inline: with it, that holds for a compiled call's temporaries too."""

import os
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


# A compiled call with a 64 MiB temporary (the [4096, 4096] product, between two matmuls), made
# eight times on one CPU device; prints the page faults of each call after the first.
CALLS = textwrap.dedent(
    """
    import resource, sys
    import jax
    import jax.numpy as jnp
    from gptjax import host_memory

    if sys.argv[1] == "inline":
        assert host_memory.run_calls_inline()
    assert host_memory.keep_freed_memory()
    assert not host_memory.run_calls_inline(), "took after the backend started"
    f = jax.jit(lambda a, b, c: (a @ b) @ c)
    args = jnp.ones((4096, 64)), jnp.ones((64, 4096)), jnp.ones((4096, 1))

    def faults() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = jax.block_until_ready(f(*args))
        assert float(out[0, 0]) == 64 * 4096
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults()
    print(*[faults() for _ in range(7)])
    """
)


def _faults_of_calls(mode: str) -> list[int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    run = subprocess.run(
        [sys.executable, "-c", CALLS, mode], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [int(n) for n in run.stdout.split()[-7:]]


def test_calls_run_inline_reuse_their_temporaries():
    # jax's asynchronous dispatch runs the call on an XLA thread, whose malloc arena mmaps the
    # 64 MiB temporary and unmaps it after: every call faults it in again (16,000+ pages)
    calls = _faults_of_calls("async")
    assert min(calls) >= 32, calls
    # On the calling thread it comes from the main heap, which keep_freed_memory keeps. The
    # temporaries are freed just after the call returns: on a busy machine the next call can
    # come first and grow the heap once more (measured: the second call), not every time.
    calls = _faults_of_calls("inline")
    assert min(calls) < 32, calls
