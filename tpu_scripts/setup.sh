#!/usr/bin/env bash
# Copies this checkout (its files as they are now, less what git ignores) to every worker and installs gptjax there
# with JAX's TPU backend. Run it again after changing the code: every worker must run the same
# code, and the preflight check stops a run whose workers disagree on versions or config.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "$here/env.sh"
repo="$(cd "$here/.." && pwd)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git -C "$repo" ls-files -z --cached --others --exclude-standard | tar -C "$repo" --null -T - -czf "$tmp/gptjax.tar.gz"
tpu_vm scp "$tmp/gptjax.tar.gz" "$TPU_NAME:gptjax.tar.gz" --worker=all
on_all_workers "set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR;
  tar -xzf ~/gptjax.tar.gz -C ~/$REMOTE_DIR; cd ~/$REMOTE_DIR;
  python3 -m pip install --quiet --upgrade pip;
  python3 -m pip install --quiet -e '.[gcs]' 'jax[tpu]>=0.10.2,<0.11';
  python3 -c 'import gptjax, jax; print(\"gptjax installed with jax\", jax.__version__)'"
