#!/bin/bash
# The torchrun alternative to `accelerate launch`: run this on every node with the same arguments.
#
#   NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 MAIN_ADDRESS=node001 launch/torchrun_train.sh --config ... --out ...  # node 0
#   NNODES=2 NODE_RANK=1 GPUS_PER_NODE=8 MAIN_ADDRESS=node001 launch/torchrun_train.sh --config ... --out ...  # node 1
#
# (python launch/nodes.py --launcher torchrun --nodes 2 --gpus-per-node 8 --main-address node001 --dry-run -- ...
# prints the same commands.) train.py's Accelerator picks up the process group torchrun sets up; on a machine
# without GPUs the processes use gloo.
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
MAIN_ADDRESS=${MAIN_ADDRESS:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}
exec torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
    --master_addr "$MAIN_ADDRESS" --master_port "$MAIN_PORT" stream_ssl/train.py "$@"
