"""Where a compiled step spends its time: a per-op profile from jax's profiler.

``profile(compiled, args, calls)`` runs an AOT-compiled function (``jit(...).lower(...).compile()``)
``calls`` times under ``jax.profiler.trace``, reads the trace back with
``jax.profiler.ProfileData`` and sums the time of every leaf XLA operation (a thunk with no
operation inside it: not the loop or conditional around one). Each operation is put in a
category by the source path XLA keeps in its metadata (``jvp(GPT)/h_0/mlp/up/dot_general``;
``transpose(...)`` marks the backward pass), read from the compiled HLO text.

On CPU the two XLA threads may run two operations at once, so the categories can add up to a
little more than the wall time (then "outside XLA operations", the wall time that no operation
accounts for — dispatch, the thunk executor, waiting — is 0); the profiler itself slows small
operations down.
"""

from __future__ import annotations

import collections
import re
import tempfile
import time
from pathlib import Path

import jax

CATEGORIES = (  # (name, pattern over the operation's source path), first match wins
    ("attention projections", r"/attn/(query|key|value|out)/"),
    ("attention core", r"/attn/"),
    ("MLP", r"/mlp/"),
    ("norms", r"/(ln_\d+|ln_f|ln_1|ln_2)/"),
    ("embedding and head", r"GPT"),
    ("loss, optimizer, rest", r""),
)


def _source_paths(hlo_text: str) -> dict[str, str]:
    """Operation name -> the op_name metadata of its instruction in the compiled HLO."""
    paths = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        paths[match.group(1)] = match.group(2)
    return paths


def category(source_path: str) -> str:
    name = next(name for name, pattern in CATEGORIES if re.search(pattern, source_path))
    return f"{name} ({'backward' if 'transpose(' in source_path else 'forward'})"


def _leaf_times(xspace_file: Path) -> collections.Counter:
    """Nanoseconds per XLA operation name, leaf operations only, over every XLA thread."""
    data = jax.profiler.ProfileData.from_file(str(xspace_file))
    times: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            ops = [e for e in line.events if any(k == "hlo_op" for k, _ in e.stats)]
            ops.sort(key=lambda e: e.start_ns)
            for op, after in zip(ops, [*ops[1:], None], strict=False):  # after: the next one
                if after is not None and after.start_ns < op.end_ns:
                    continue  # another operation runs inside this one: a loop or a branch
                times[op.name] += op.duration_ns
    return times


def profile(compiled, args: tuple, calls: int, steps_per_call: int = 1) -> dict:
    """Runs ``compiled(*args)`` ``calls`` times under the profiler (``args[0]`` is donated and
    replaced by the first output, as a train step's state). Returns ``wall_ms`` and
    ``categories``: {category: ms} per step, largest first."""
    paths = _source_paths(compiled.as_text())
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            start = time.perf_counter()
            for _ in range(calls):
                state, out = compiled(*args)
                jax.block_until_ready(out)
                args = (state, *args[1:])
            wall = time.perf_counter() - start
        (xspace_file,) = Path(logdir).rglob("*.xplane.pb")
        times = _leaf_times(xspace_file)
    steps = calls * steps_per_call
    per_category: collections.Counter = collections.Counter()
    for op, ns in times.items():
        per_category[category(paths.get(op, ""))] += ns / 1e6 / steps
    wall_ms = 1000 * wall / steps
    per_category["outside XLA operations"] = max(0.0, wall_ms - sum(per_category.values()))
    return {
        "wall_ms": wall_ms,
        "categories": dict(per_category.most_common()),
    }
