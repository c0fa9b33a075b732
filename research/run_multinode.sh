#!/usr/bin/env bash
# Start this server's share of a multi-server job and supervise it (MindFormers' run_multinode.sh).
#
#   bash run_multinode.sh "<command>" RANK_TABLE_FILE [START,END] RANK_SIZE
#
# Global ranks START..END-1 ([8,16] and [8,16) mean the same) run on local devices 0..END-START-1;
# RANK_SIZE is the whole job. Node 1 of two 8-device servers: [0,8] 16, node 2: [8,16] 16, both with
# the same merged rank table (merge_hccl.py). Logs: ./output/log/rank_<RANK_ID>/mindformer.log.
# Without Ascend (CPU) the nodes join MindSpore's dynamic cluster: the node whose range starts at 0 runs
# the scheduler; all nodes use MS_SCHED_HOST (default 127.0.0.1) and MS_SCHED_PORT (default 8118).
# Two "nodes" on one machine: bash run_multinode.sh "<cmd>" table.json [0,1] 2 & and
#                             bash run_multinode.sh "<cmd>" table.json [1,2] 2
# A failing rank stops this node's other ranks and the launcher exits non-zero naming it.
# Details and environment variables: launch_common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
mf_launch multi "$@"
