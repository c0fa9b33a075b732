#!/usr/bin/env bash
# The main job on a small built-in default, on CPU: preprocess the bundled Belle sample with the
# bundled tiny tokenizer, fine-tune a tiny Baichuan2-7B-shaped model for a few minutes (the loss
# falls), then predict from the saved checkpoint. Everything is written under ./demo_work/.
# Options (environment): DEMO_CONFIG (default the tiny 7B yaml), DEMO_EPOCHS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
CONFIG=${DEMO_CONFIG:-research/baichuan2/run_baichuan2_7b_cpu_tiny.yaml}
EPOCHS=${DEMO_EPOCHS:-3}
WORK=demo_work
SEQ=128
export GLOG_v=${GLOG_v:-3}
rm -rf "$WORK" && mkdir -p "$WORK/data"

echo "== 1/3 preprocess: bundled Belle sample -> MindRecord (seq_length $SEQ)"
$PY research/baichuan2/belle_preprocess.py \
  --input_glob research/baichuan2/assets/belle_sample.json \
  --model_file research/baichuan2/assets/tokenizer.model \
  --output_file "$WORK/data/belle_$SEQ.mindrecord" \
  --seq_length $SEQ

echo "== 2/3 finetune on CPU ($EPOCHS epochs; per-step loss below, log in $WORK/output/log/rank_0/info.log)"
sed "s/^  epochs: .*/  epochs: $EPOCHS/" "$CONFIG" > "$WORK/config.yaml"
sed -i "s#vocab_file: 'assets/tokenizer.model'#vocab_file: '$(pwd)/research/baichuan2/assets/tokenizer.model'#" "$WORK/config.yaml"
$PY research/baichuan2/run_baichuan2.py --config "$WORK/config.yaml" --run_mode finetune \
  --train_data "$WORK/data" --output_dir "$WORK/output" --device_target CPU 2>&1 \
  | grep --line-buffered -E "loss:\[|Error|error:" | sed -E 's/.*(Epoch:.*loss:\[[^]]*\]).*per_step_time: ([0-9]+ms).*/\1 \2/'
CKPT=$(ls -t "$WORK"/output/checkpoint/rank_0/*.ckpt | head -1)
echo "checkpoint: $CKPT"

echo "== 3/3 predict from the fine-tuned checkpoint"
(cd "$WORK" && ../$PY ../research/baichuan2/run_baichuan2.py --config config.yaml --run_mode predict \
  --load_checkpoint "../$CKPT" --device_target CPU --max_new_tokens 48 \
  --predict_data "<reserved_106>请介绍一下你自己<reserved_107>" 2>&1 | grep "text_generation_text" | tail -1)
echo "result also in $WORK/text_generation_result.txt"
