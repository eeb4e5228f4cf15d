#!/usr/bin/env bash
# Runs one shell command line on every worker at once, e.g. to mount the shared folder a pod
# slice's --workdir must live in:
#
#   tpu_scripts/on_all.sh 'sudo apt-get install -y nfs-common && sudo mkdir -p /mnt/shared &&
#     sudo mount -t nfs 10.1.2.3:/share /mnt/shared && sudo chmod a+rwx /mnt/shared'
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "$here/env.sh"

if (($# != 1)); then
  echo "usage: $0 'COMMAND LINE' (one argument, run by the shell of every worker)" >&2
  exit 2
fi
on_all_workers "$1"
