#!/usr/bin/env bash
# Streams the run's log of one worker (default 0, the one that logs), or of all with `all`
# (their lines interleave). Ctrl-C stops following; the run goes on.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "$here/env.sh"

tpu_vm ssh "$TPU_NAME" --worker="${1:-0}" --command="tail -n +1 -F ~/$LOG_FILE"
