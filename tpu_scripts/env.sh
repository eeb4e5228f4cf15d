# shellcheck shell=bash
# Settings shared by tpu_scripts/*.sh (sourced, not run). Each can be overridden from the
# environment, e.g. `ACCELERATOR_TYPE=v5litepod-16 ZONE=us-west4-a tpu_scripts/create.sh`.

: "${TPU_NAME:=gptjax}"                         # the TPU VM (and queued resource) name
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR_TYPE:=v4-8}"                   # v4-8, v5litepod-16, v5p-64, ...
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"     # v4; v5e: v2-alpha-tpuv5-lite; v5p: v2-alpha-tpuv5
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${QUEUED:=0}"                                # 1 = ask through queued resources (waits for capacity)
: "${SPOT:=0}"                                  # 1 = spot capacity: cheaper, may be preempted
: "${REMOTE_DIR:=gptjax}"                       # the code's folder on each worker, under $HOME
: "${LOG_FILE:=gptjax-run.log}"                 # each worker's log of the run, under $HOME
: "${PID_FILE:=gptjax-run.pid}"

if [[ -z "$PROJECT" ]]; then
  echo "tpu_scripts: no Google Cloud project; set PROJECT=... or run gcloud config set project" >&2
  exit 2
fi

# gcloud compute tpus tpu-vm SUBCOMMAND ARGS... in our zone and project.
tpu_vm() {
  local sub="$1"
  shift
  gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" --project="$PROJECT"
}

# Runs one shell command line on every worker of the slice at once (--worker=all).
on_all_workers() {
  tpu_vm ssh "$TPU_NAME" --worker=all --command="$1"
}
