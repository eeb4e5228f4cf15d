"""Host memory on CPU: keep what a compiled call frees for the next call.

XLA:CPU allocates a call's temporary buffers (activations, gradients: megabytes to gigabytes)
with malloc and frees them when the call returns. glibc serves large allocations with mmap and
hands them back to the OS on free, and trims the top of its heap, so the next call faults every
page in again. On the 2-core VMs this project is measured on that is a large part of a small
step. ``keep_freed_memory`` turns both off (mallopt(3): ``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD``
2 GiB): freed buffers stay in the process and the next call reuses them. Measured in one process,
alternating calls with and without it (``benchmarks/train.py`` shapes, ms per step):

    char    one step per call 76 -> 44, ten per call 60 -> 53
    default one step per call 797 -> 747, ten per call 725 -> 664
    small   one step per call 3175 -> 3013

The cost: the process keeps the most memory it has used until it exits, instead of returning it
between calls. The training loop calls this on CPU (``gptjax/training/loop.py``); elsewhere
(GPU/TPU buffers are not malloc'd) and on a C library without mallopt it does nothing.

What it does not reach alone: under jax's asynchronous dispatch XLA allocates on its executor
threads, which glibc serves from per-thread arenas; a request larger than such an arena's heap
(64 MiB) is always mmap'd, whatever ``M_MMAP_MAX`` says, and unmapped on free. The small shape's
step (16 x 256 tokens) then faults in its 1.27 GB of temporaries on every call (~317,000 minor
faults, counted with getrusage). One arena for the whole process (``M_ARENA_MAX`` 1 and a 2 GiB
``M_TOP_PAD``, set before jax starts its threads) removes most of them. Three pairs of
processes, taking turns, the small shape: one step per call 2503-2721 -> 2203-2274 ms, ten steps
per call 2207-2304 -> 2288-2558 ms. Not used: it slowed ten steps per call, and the experiments
run 25-50 per call on CPU; and it would have to be set process-wide before jax starts, for every
program in the process.

What reaches them: running each call on the thread that makes it. ``run_calls_inline`` turns off
jax's asynchronous dispatch on CPU (``jax_cpu_enable_async_dispatch``; it applies to calls on
one device, a call over several devices still runs on XLA's threads), so a call's temporaries
come from the main arena, where ``keep_freed_memory``'s settings hold, and the small shape's
call faults no page in after the first (a call's temporaries are freed just after it returns; on
a busy machine the next call can start first and grow the heap once more). ``pretrain``,
``finetune`` and ``gptjax.load`` (decoding) call it before anything starts jax's backends. The
caller then waits for each call, which costs the training loop nothing measurable: on CPU the
compiled call uses every core, and the host's work between calls (batches, metrics) is small and
prefetched (nanoGPT's char recipe, whole runs alternated: 87.3 and 86.7 s with it, 86.9 and
86.6 s without). Measured with processes taking turns (``benchmarks/train.py`` shapes, ms per
step, two processes each way, medians of the calls after the first: 5 small, 7 default, 29 char;
minor faults per call):

    small   one step per call 2390, 2193 -> 1930, 1924 (318,000 faults -> 0)
            ten per call      2095, 1852 -> 1938, 1984
    default one step per call  601,  610 ->  463,  423 (123,000 faults -> 0)
            ten per call       454,  469 ->  483,  460
    char    one step per call   40,   39 ->   40,   40 (no faults either way)
"""

from __future__ import annotations

import ctypes
import sys

import jax

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # an int: never give the heap top back


def keep_freed_memory() -> bool:
    """On the CPU backend with glibc: freed memory stays in the process (see the module
    docstring). Returns whether the setting took."""
    if jax.default_backend() != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def run_calls_inline() -> bool:
    """Compiled calls on one CPU device run on the thread that makes them (see the module
    docstring), for the rest of the process. Only jax's CPU backend reads the setting, when it
    starts: call this before anything touches a device. Returns whether it took — False once
    the backends are up (then nothing changes)."""
    from jax._src.xla_bridge import backends_are_initialized  # jax 0.10 has no public check

    if backends_are_initialized():
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
