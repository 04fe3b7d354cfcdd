#!/usr/bin/env bash
# Submit a training run to a Ray cluster (deploy/cluster.yaml, or any cluster whose dashboard you can reach).
# Run from the repository root:
#   ray dashboard deploy/cluster.yaml &            # a cluster from `ray up`: dashboard on localhost:8265
#   RAY_AUTH_MODE=token bash deploy/submit.sh      # the cluster's token from ~/.ray/auth_token
# The entrypoint runs on the head node as the rlalign driver: it joins the cluster (Ray sets RAY_ADDRESS for it)
# and leaves Ray's auth settings alone. Extra key=value overrides after the script's name are appended.
set -euo pipefail
ADDRESS="${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}"
# out_dir: storage every node sees (shared filesystem mounted at the same path, e.g. EFS/NFS), never a path
# relative to the job's working_dir (that is Ray's temporary copy of the repository)
OUT_DIR="${RLALIGN_OUT_DIR:-/mnt/shared/rlalign-runs}"

ray job submit --address "$ADDRESS" --runtime-env deploy/runtime_env.yaml -- \
  rlalign train configs/tailorpo_sd15.yaml ray.address=auto ray.autoscaling=true ray.pending_actor_timeout_s=900 \
  "out_dir=$OUT_DIR" "$@"
