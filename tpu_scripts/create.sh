#!/usr/bin/env bash
# Creates the TPU VM or pod slice $TPU_NAME ($ACCELERATOR_TYPE in $ZONE) and waits until it is
# ready. QUEUED=1 goes through queued resources, which wait for capacity instead of failing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "$here/env.sh"

spot=()
if [[ "$SPOT" == 1 ]]; then
  spot=(--spot)
fi

if [[ "$QUEUED" != 1 ]]; then
  tpu_vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${spot[@]}"
  exit 0
fi

gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
  --zone="$ZONE" --project="$PROJECT" "${spot[@]}"
while true; do
  state="$(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" \
    --project="$PROJECT" --format='value(state.state)')"
  case "$state" in
    ACTIVE) break ;;
    FAILED | SUSPENDED | SUSPENDING)
      echo "create.sh: queued resource $TPU_NAME is $state; see" \
        "gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE" >&2
      exit 1
      ;;
    *)
      echo "create.sh: queued resource $TPU_NAME is ${state:-unknown}; checking again in 60 s"
      sleep 60
      ;;
  esac
done
echo "create.sh: $TPU_NAME ($ACCELERATOR_TYPE) is ready"
