#!/usr/bin/env bash
# Starts `python3 -m gptjax ARGS...` on every worker at once, detached from the ssh session, and
# returns. Each worker logs to ~/$LOG_FILE; follow worker 0 with tpu_scripts/logs.sh.
#
#   tpu_scripts/launch.sh pretrain --config shakespeare --workdir gs://MY-BUCKET/runs/shakespeare
#
# --dist.num_processes=0 lets JAX's Cloud TPU detection give each worker its process id, the
# process count and the coordinator (worker 0). On a pod slice the --workdir must be one place
# that every worker sees (a gs:// bucket path, or a shared mount): Orbax writes each worker's
# shards of a checkpoint there.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "$here/env.sh"

if (($# == 0)); then
  echo "usage: $0 pretrain|finetune [--config NAME] [--workdir DIR] [--section.key=value ...]" >&2
  exit 2
fi
command="$(printf '%q' "$1")"
shift
args=""
if (($# > 0)); then
  args="$(printf ' %q' "$@")"
fi
# The run gets its own process group (setsid), which stop.sh signals as a whole. Later
# --dist.* arguments of yours win over the auto-detection default.
on_all_workers "cd ~/$REMOTE_DIR || exit 1; nohup setsid python3 -m gptjax $command \
--dist.num_processes=0$args > ~/$LOG_FILE 2>&1 < /dev/null & echo \$! > ~/$PID_FILE"
echo "launch.sh: started on every worker of $TPU_NAME; follow it with $here/logs.sh"
