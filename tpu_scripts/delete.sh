#!/usr/bin/env bash
# Deletes the TPU VM or pod slice (and its queued resource when QUEUED=1). Billing stops here.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "$here/env.sh"

if [[ "$QUEUED" == 1 ]]; then
  gcloud compute tpus queued-resources delete "$TPU_NAME" --force --quiet \
    --zone="$ZONE" --project="$PROJECT"
else
  tpu_vm delete "$TPU_NAME" --quiet
fi
