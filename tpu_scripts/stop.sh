#!/usr/bin/env bash
# Stops the run on every worker: SIGTERM to its process group, then SIGKILL for whatever is
# still there after 30 s. (Not SIGINT: a command started in the background by a non-interactive
# shell ignores it.) Checkpoints already written stay valid; the TPU VMs keep running.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "$here/env.sh"

on_all_workers "if [ -f ~/$PID_FILE ]; then pid=\$(cat ~/$PID_FILE);
  kill -TERM -- -\$pid 2>/dev/null || true;
  for _ in \$(seq 30); do kill -0 -- -\$pid 2>/dev/null || break; sleep 1; done;
  kill -KILL -- -\$pid 2>/dev/null || true; rm -f ~/$PID_FILE; fi"
echo "stop.sh: stopped the run on every worker of $TPU_NAME"
