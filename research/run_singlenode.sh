#!/usr/bin/env bash
# Start one process per device of this server and supervise them (MindFormers' run_singlenode.sh).
#
#   bash run_singlenode.sh "<command>" RANK_TABLE_FILE [START,END] RANK_SIZE
#
# Devices START..END-1 ([0,8] and [0,8) mean the same); rank i-START runs on device i. Logs:
# ./output/log/rank_<RANK_ID>/mindformer.log. On Ascend the ranks connect through HCCL and the rank
# table; without Ascend (CPU) through MindSpore's dynamic cluster (scheduler on 127.0.0.1, a free port
# per run). A failing rank stops the others and the launcher exits non-zero naming it.
# Details and environment variables: launch_common.sh. Example (from research/):
#   bash run_singlenode.sh "python baichuan2/run_baichuan2.py --config baichuan2/run_baichuan2_7b_910b.yaml \
#     --load_checkpoint model_dir/xxx.ckpt --auto_trans_ckpt True --use_parallel True --run_mode finetune \
#     --train_data dataset_dir" RANK_TABLE_FILE [0,8] 8
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
mf_launch single "$@"
