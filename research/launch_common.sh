# Shared by run_singlenode.sh and run_multinode.sh (sourced, not run). Starts one process per rank,
# supervises them, and stops everything if one rank fails.
#
#   bash run_singlenode.sh "<command>" RANK_TABLE_FILE [START,END] RANK_SIZE
#   bash run_multinode.sh  "<command>" RANK_TABLE_FILE [START,END] RANK_SIZE
#
# Arguments as in MindFormers: [START,END] and [START,END) both mean devices START..END-1; the rank
# table must exist (a relative path is made absolute). Each rank gets RANK_ID, DEVICE_ID, RANK_SIZE and
# RANK_TABLE_FILE and writes stdout+stderr to ./output/log/rank_<RANK_ID>/mindformer.log.
#   single node: DEVICE_ID=i, RANK_ID=i-START (END-START must equal RANK_SIZE)
#   multi node:  RANK_ID=i,   DEVICE_ID=i-START (node 2 of 2x8 is started with [8,16] 16)
#
# Backend (decided only here, in mf_launch_backend):
#   MF_LAUNCH_BACKEND=hccl|msrun overrides; else DEVICE_TARGET=Ascend -> hccl, CPU/GPU -> msrun;
#   else hccl when npu-smi is on PATH or /usr/local/Ascend exists, msrun otherwise.
#   hccl : the ranks find each other through RANK_TABLE_FILE (HCCL, Ascend), as in the original.
#   msrun: MindSpore's dynamic cluster (what msrun does; the only way on CPU): a scheduler process
#          (MS_ROLE=MS_SCHED, log ./output/log/scheduler.log) and one MS_WORKER per rank with
#          MS_NODE_ID=RANK_ID, MS_WORKER_NUM=RANK_SIZE, MS_SCHED_HOST, MS_SCHED_PORT. The rank table
#          is still required and exported but not used by MindSpore.
#          Single node: scheduler on 127.0.0.1, a free port per run (or MS_SCHED_PORT).
#          Multi node: the node whose range starts at 0 runs the scheduler (MF_LAUNCH_SCHEDULER=1/0
#          overrides); every node must use the same MS_SCHED_HOST (default 127.0.0.1, i.e. nodes on one
#          machine; set it to the first node's IP on real machines) and MS_SCHED_PORT (default 8118).
#          MS_TOPO_TIMEOUT (default 600 s) bounds the wait for the other nodes.
#
# Supervision: the launcher waits for its ranks. If one exits non-zero (or is killed), it names the
# rank, stops the others (TERM, then KILL after MF_LAUNCH_GRACE seconds, default 5) and exits with that
# status. INT/TERM/HUP to the launcher stop all ranks too. Every rank runs in its own session/process
# group, and whole groups are stopped, so nothing is left running and a rerun needs no clean-up.

mf_usage() {
  local name
  name=$(basename "$0")
  echo "Usage: bash $name \"<command>\" RANK_TABLE_FILE [START,END] RANK_SIZE" >&2
  echo "  e.g. bash $name \"python baichuan2/run_baichuan2.py --config ... --use_parallel True\" \\" >&2
  echo "         hccl_8p_01234567_x.x.x.x.json [0,8] 8" >&2
}

mf_die() {  # message, exit status
  echo "error: $1" >&2
  exit "${2:-1}"
}

mf_launch_backend() {  # the one place that decides how ranks are connected
  case "${MF_LAUNCH_BACKEND:-}" in
    hccl|msrun) echo "$MF_LAUNCH_BACKEND"; return ;;
    "") ;;
    *) mf_die "MF_LAUNCH_BACKEND must be hccl or msrun, got '$MF_LAUNCH_BACKEND'" ;;
  esac
  case "${DEVICE_TARGET:-}" in
    Ascend) echo hccl; return ;;
    CPU|GPU) echo msrun; return ;;
  esac
  if command -v npu-smi >/dev/null 2>&1 || [ -d /usr/local/Ascend ]; then
    echo hccl
  else
    echo msrun
  fi
}

mf_free_port() {
  "$MF_LAUNCH_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

MF_PIDS=()      # rank processes (each its own session and process group)
MF_RANKS=()
MF_DEVICES=()
MF_DONE=()      # 1 once reaped
MF_SCHED_PID=""
MF_SCHED_DONE=1
MF_CLEANED=0

mf_alive_groups() {  # pids (= process group ids) still to stop
  local k
  for k in "${!MF_PIDS[@]}"; do
    [ "${MF_DONE[$k]}" = 1 ] || echo "${MF_PIDS[$k]}"
  done
  [ "$MF_SCHED_DONE" = 1 ] || echo "$MF_SCHED_PID"
}

mf_stop_all() {  # TERM every group, wait up to the grace period, KILL what is left, reap
  [ "$MF_CLEANED" = 1 ] && return
  MF_CLEANED=1
  local groups pid waited=0 grace="${MF_LAUNCH_GRACE:-5}" any
  groups=$(mf_alive_groups)
  [ -z "$groups" ] && return
  for pid in $groups; do kill -TERM -- "-$pid" 2>/dev/null; done
  while [ "$waited" -lt $((grace * 10)) ]; do
    any=0
    for pid in $groups; do
      if kill -0 -- "-$pid" 2>/dev/null; then any=1; break; fi
    done
    [ "$any" = 0 ] && break
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in $groups; do kill -KILL -- "-$pid" 2>/dev/null; done
  for pid in $groups; do wait "$pid" 2>/dev/null; done
  local k
  for k in "${!MF_PIDS[@]}"; do MF_DONE[$k]=1; done
  MF_SCHED_DONE=1
}

mf_on_signal() {
  echo "launcher: got SIG$1, stopping all ranks" >&2
  mf_stop_all
  trap - EXIT
  case "$1" in INT) exit 130 ;; HUP) exit 129 ;; *) exit 143 ;; esac
}

mf_describe_status() {
  local rc=$1
  if [ "$rc" -gt 128 ]; then
    echo "status $rc (killed by signal $((rc - 128)))"
  else
    echo "status $rc"
  fi
}

mf_fail_rank() {  # index, exit status
  local k=$1 rc=$2 log="output/log/rank_${MF_RANKS[$1]}/mindformer.log"
  echo "error: rank ${MF_RANKS[$k]} (device ${MF_DEVICES[$k]}, pid ${MF_PIDS[$k]}) exited with" \
       "$(mf_describe_status "$rc"); stopping the other ranks. Log: $log" >&2
  if [ -f "$log" ]; then
    echo "---- last lines of $log ----" >&2
    tail -n 15 "$log" >&2
    echo "----" >&2
  fi
  mf_stop_all
  trap - EXIT
  exit "$rc"
}

mf_supervise() {
  local k pid rc running
  while :; do
    running=0
    for k in "${!MF_PIDS[@]}"; do
      [ "${MF_DONE[$k]}" = 1 ] && continue
      pid=${MF_PIDS[$k]}
      if kill -0 "$pid" 2>/dev/null; then
        running=$((running + 1))
        continue
      fi
      wait "$pid"
      rc=$?
      MF_DONE[$k]=1
      kill -KILL -- "-$pid" 2>/dev/null   # stray children of a finished rank
      [ "$rc" -ne 0 ] && mf_fail_rank "$k" "$rc"
      echo "rank ${MF_RANKS[$k]} finished"
    done
    if [ "$MF_SCHED_DONE" != 1 ] && ! kill -0 "$MF_SCHED_PID" 2>/dev/null; then
      wait "$MF_SCHED_PID"
      rc=$?
      MF_SCHED_DONE=1
      if [ "$rc" -ne 0 ] && [ "$running" -gt 0 ]; then
        echo "error: the MindSpore scheduler (pid $MF_SCHED_PID) exited with $(mf_describe_status "$rc");" \
             "stopping the ranks. Log: output/log/scheduler.log" >&2
        tail -n 15 output/log/scheduler.log >&2 2>/dev/null
        mf_stop_all
        trap - EXIT
        exit "$rc"
      fi
    fi
    [ "$running" -eq 0 ] && break
    sleep 0.5
  done
  if [ "$MF_SCHED_DONE" != 1 ]; then  # the scheduler leaves once all workers have unregistered
    local waited=0
    while kill -0 "$MF_SCHED_PID" 2>/dev/null && [ "$waited" -lt 300 ]; do sleep 0.1; waited=$((waited + 1)); done
  fi
  mf_stop_all
  trap - EXIT
  echo "all ${#MF_PIDS[@]} rank(s) finished"
}

mf_launch() {  # mode (single|multi), then the 4 user arguments
  local mode=$1
  shift
  if [ $# -ne 4 ]; then
    mf_usage
    exit 1
  fi
  local command=$1 table=$2 range=$3 size=$4
  local inner=${range:1:${#range}-2}
  local start=${inner%%,*} end=${inner#*,}
  if [ "$inner" = "$start" ] || ! [[ "$start" =~ ^[0-9]+$ && "$end" =~ ^[0-9]+$ ]]; then
    mf_usage
    mf_die "[START,END] must hold two non-negative integers, e.g. [0,8] or [0,8), got '$range'"
  fi
  start=$((10#$start)); end=$((10#$end))
  [[ "$size" =~ ^[0-9]+$ ]] && [ "$((10#$size))" -gt 0 ] || mf_die "RANK_SIZE must be a positive integer, got '$size'"
  size=$((10#$size))
  [ "$start" -lt "$end" ] || mf_die "[START,END] = $range starts no rank (START must be less than END)"
  if [ "$mode" = single ]; then
    [ $((end - start)) -eq "$size" ] ||
      mf_die "single node: [START,END] = $range starts $((end - start)) rank(s) but RANK_SIZE is $size"
  else
    [ "$end" -le "$size" ] ||
      mf_die "multi node: [START,END] = $range gives ranks up to $((end - 1)) but RANK_SIZE is $size (0..$((size - 1)))"
  fi
  case "$table" in /*) ;; *) table=$(realpath -m "$PWD/$table") ;; esac
  [ -f "$table" ] || mf_die "RANK_TABLE_FILE $table does not exist (make one with mindformers/tools/hccl_tools.py)"

  MF_LAUNCH_PYTHON=${MF_LAUNCH_PYTHON:-python}
  command -v "$MF_LAUNCH_PYTHON" >/dev/null 2>&1 || MF_LAUNCH_PYTHON=python3
  local backend
  backend=$(mf_launch_backend) || exit 1
  ulimit -u unlimited 2>/dev/null
  export RANK_SIZE=$size
  export RANK_TABLE_FILE=$table
  mkdir -p output/log

  trap 'mf_on_signal INT' INT
  trap 'mf_on_signal TERM' TERM
  trap 'mf_on_signal HUP' HUP
  trap 'mf_stop_all' EXIT

  local sched_host sched_port run_sched=0
  if [ "$backend" = msrun ]; then
    sched_host=${MS_SCHED_HOST:-127.0.0.1}
    if [ "$mode" = single ]; then
      run_sched=1
      sched_port=${MS_SCHED_PORT:-$(mf_free_port)}
    else
      [ "$start" -eq 0 ] && run_sched=1
      case "${MF_LAUNCH_SCHEDULER:-}" in 1) run_sched=1 ;; 0) run_sched=0 ;; esac
      sched_port=${MS_SCHED_PORT:-8118}
    fi
    [[ "$sched_port" =~ ^[0-9]+$ ]] || mf_die "MS_SCHED_PORT must be a port number, got '$sched_port'"
    echo "backend msrun (MindSpore dynamic cluster): scheduler $sched_host:$sched_port" \
         "$([ "$run_sched" = 1 ] && echo "started here" || echo "on another node"), RANK_SIZE $size"
    if [ "$run_sched" = 1 ]; then
      (
        export MS_ROLE=MS_SCHED MS_SCHED_HOST=$sched_host MS_SCHED_PORT=$sched_port MS_WORKER_NUM=$size
        export MS_TOPO_TIMEOUT=${MS_TOPO_TIMEOUT:-600} RANK_ID=0
        exec setsid "$MF_LAUNCH_PYTHON" -c 'import mindspore as ms
ms.set_context(device_target="CPU")
from mindspore.communication import init
init()'
      ) > output/log/scheduler.log 2>&1 &
      MF_SCHED_PID=$!
      MF_SCHED_DONE=0
    fi
  else
    echo "backend hccl (RANK_TABLE_FILE $table), RANK_SIZE $size"
  fi

  local i rank device
  for ((i = start; i < end; i++)); do
    if [ "$mode" = single ]; then
      device=$i; rank=$((i - start))
    else
      rank=$i; device=$((i - start))
    fi
    mkdir -p "output/log/rank_$rank"
    echo "start training for rank $rank, device $device"
    (
      export RANK_ID=$rank DEVICE_ID=$device
      if [ "$backend" = msrun ]; then
        export MS_ROLE=MS_WORKER MS_NODE_ID=$rank MS_WORKER_NUM=$size
        export MS_SCHED_HOST=$sched_host MS_SCHED_PORT=$sched_port MS_TOPO_TIMEOUT=${MS_TOPO_TIMEOUT:-600}
      fi
      exec setsid bash -c "$command"
    ) > "output/log/rank_$rank/mindformer.log" 2>&1 &
    MF_PIDS+=("$!")
    MF_RANKS+=("$rank")
    MF_DEVICES+=("$device")
    MF_DONE+=(0)
  done
  mf_supervise
}
