"""The user-error type.

Every check of something a user controls — a config value, a file, a dataset, a device layout,
a checkpoint, a chat message — raises ``GptjaxError`` with one line that names the problem and
the fix. The CLI prints exactly that line and exits with code 2; any other exception is a bug
in gptjax (or a library below it) and keeps its traceback. ``GptjaxError`` subclasses
``ValueError``, so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations


class GptjaxError(ValueError):
    """Something the user can fix: the message says what and how, in one line."""


class TrainingDiverged(GptjaxError):
    """The loss or gradient norm stopped being finite; nothing from that step on was saved."""
