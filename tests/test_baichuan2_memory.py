"""The memory planner: arithmetic, the original's hardware matrix, the CLI, the pre-flight, and the plan
against the peak RSS measured on this machine's CPU backend (in fresh processes, same test run)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "research", "baichuan2")
BENCHMARKS = os.path.join(ROOT, "benchmarks")
for path in (PLUGIN, BENCHMARKS):
    if path not in sys.path:
        sys.path.insert(0, path)

import baichuan2_memory as mem  # noqa: E402
from baichuan2_parallel import layer_to_stage  # noqa: E402
from baichuan2_config import read_yaml_config  # noqa: E402

GIB = mem.GIB
ATLAS_800 = 31 * GIB          # max_device_memory "31GB" of the Atlas 800 (32 GB) yamls
ATLAS_800T_A2 = 59 * GIB      # "59GB" of the Atlas 800T A2 (64 GB) yamls
PLAN_SCRIPT = os.path.join(PLUGIN, "plan_memory.py")


def yaml_config(name):
    return read_yaml_config(os.path.join(PLUGIN, f"run_baichuan2_{name}.yaml"))


def plan_yaml(name, run_mode="finetune", device_memory=None, parallel=None, **overrides):
    config = yaml_config(name)
    if parallel:
        config["parallel_config"] = dict(config.parallel_config, **parallel)
    return mem.plan_from_config(config, run_mode=run_mode, device_memory_bytes=device_memory, **overrides)


# ----- arithmetic -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params", [("7b", 7_505_973_248), ("13b", 13_896_668_160)])
def test_weights_count_every_parameter_once(name, params):
    """fp32, one device: weights = 4 bytes x the released parameter count (facts: 7.506e9 / 13.897e9)."""
    model_config = dict(yaml_config(name).model.model_config, param_init_type="float32")
    plan = mem.plan(model_config, {}, run_mode="predict", device="Ascend", framework_bytes=0,
                    use_past=False, device_memory_bytes=2 ** 50)
    assert plan.parts["weights"] == 4 * params


def test_parts_add_up_and_stage_rule_is_the_projects():
    plan = plan_yaml("7b")
    assert plan.per_device_bytes == sum(plan.parts.values())
    for layers, pp in ((32, 2), (40, 4), (40, 2), (5, 3)):
        assert mem.layers_per_stage(layers, pp) == [
            sum(1 for l in range(layers) if layer_to_stage(l, layers, pp) == s) for s in range(pp)]
    assert mem.layers_per_stage(32, 2) == [16, 16] and mem.layers_per_stage(40, 4) == [10] * 4


def test_kv_cache_formula():
    """7B, seq 4096, batch 1, fp16: 32 layers x 2 x 32 heads x 4096 x 128 x 2 bytes = 2 GiB."""
    plan = plan_yaml("7b_4096_910b", run_mode="predict", use_past=True, batch_size=1)
    assert plan.parts["KV cache"] == 32 * 2 * 32 * 4096 * 128 * 2 == 2 * GIB
    assert "KV cache" not in plan_yaml("7b_4096_910b", run_mode="predict", use_past=False).parts


def test_attention_memory_follows_the_path_the_model_takes():
    """Flash attention only where the model runs it (Ascend, no use_past): on CPU a YAML's
    ``use_flash_attention: True`` plans the portable attention's probabilities (S x S per head and layer) and
    its once-per-step mask and backward working set. 13B (ALiBi, read from ``model.arch.type``) has no
    shared rotary tables, 7B does: 2 fp32 (B, S, h)."""
    seq, heads, layers = 4096, 32, 32
    ascend = plan_yaml("7b_4096_910b")                     # use_flash_attention True, recompute False
    cpu = plan_yaml("7b_4096_910b", device="CPU")
    scores = seq * seq * heads
    probs = 4 + 2                                          # fp32 softmax output and its fp16 copy
    once = scores * (1 + 3 * 4)
    assert cpu.parts["activations"] - ascend.parts["activations"] == layers * probs * scores + once \
        + 2 * layers * (2 * 4 * 4096 + 2 * 4096) * seq     # the portable RMSNorm's items (fused on Ascend)
    config = yaml_config("7b_4096_910b")
    config["model"]["arch"]["type"] = "Baichuan13BV2ForCausalLM"
    alibi = mem.plan_from_config(config, run_mode="finetune", device_memory_bytes=None)
    assert ascend.parts["activations"] - alibi.parts["activations"] == 2 * 4 * seq * 4096
    # Without model.arch.type the network is built from trainer.model_name, and so is the plan.
    config["model"]["arch"]["type"] = None
    config["trainer"]["model_name"] = "baichuan2_13b"
    by_name = mem.plan_from_config(config, run_mode="finetune", device_memory_bytes=None)
    assert by_name.parts["activations"] == alibi.parts["activations"]


def test_cpu_kernel_index_tables_per_compiled_graph():
    """On CPU each compiled graph keeps 8 bytes per output element of every Transpose (4 per layer forward,
    4 more in a training backward); generation compiles one prefill graph per power-of-two width up to
    seq_length, the rule of ``baichuan2_generation._bucket``. Ascend plans none."""
    from baichuan2_generation import _bucket  # pylint: disable=import-outside-toplevel
    for seq in (16, 100, 512, 4096):
        assert mem.prefill_widths(seq) == sorted({_bucket(n, seq) for n in range(1, seq + 1)})
    model = {"vocab_size": 1000, "hidden_size": 64, "num_layers": 3, "num_heads": 4, "seq_length": 128,
             "intermediate_size": 160}
    per_layer_token = 8 * 64                                     # 8 bytes x hidden, per Transpose
    predict = mem.plan(model, run_mode="predict", batch_size=2, device="CPU")
    assert predict.parts["CPU kernel index tables"] == 3 * 4 * per_layer_token * 2 * (16 + 32 + 64 + 128)
    evaluate = mem.plan(model, run_mode="eval", device="CPU")
    assert evaluate.parts["CPU kernel index tables"] == 3 * 4 * per_layer_token * 128
    train = mem.plan(model, run_mode="finetune", batch_size=2, device="CPU")
    assert train.parts["CPU kernel index tables"] == 3 * 8 * per_layer_token * 2 * 128
    assert "CPU kernel index tables" not in mem.plan(model, run_mode="finetune", device="Ascend").parts


def test_cpu_training_logits_buffers_and_their_judgement_agree():
    """CPU training plans 3 tokens x vocab fp32 buffers with a trained fp32 head, 2 with LoRA's frozen head
    (NormHead's one-pass kernels with the loss fused into the head), 8 and 6 when the head runs in MindSpore ops
    (half precision), and the judgement line states the count the part used."""
    model = {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "seq_length": 128,
             "intermediate_size": 160}
    lora = {"pet_type": "lora", "lora_rank": 8, "target_modules": ".*wq|.*wk|.*wv"}
    half = dict(model, param_init_type="float16", compute_dtype="float16")
    for config, pet_config, count in ((model, None, 3), (model, lora, 2), (half, None, 8), (half, lora, 6)):
        planned = mem.plan(config, run_mode="finetune", batch_size=2, device="CPU", pet_config=pet_config)
        assert planned.parts["logits / loss"] == count * 2 * 128 * 1000 * 4
        assert f"logits / loss: {count} fp32 tokens x vocab buffers (measured on CPU)" in planned.judgements


def test_norm_head_kernels_leave_no_head_temporary_and_follow_the_device_rule():
    """The planner's rule for NormHead's kernels is baichuan2_device's: fp32 heads on a device that has them;
    with them there is no V x h ``w * w`` temporary (training or inference)."""
    from baichuan2_device import _TABLE  # pylint: disable=import-outside-toplevel
    assert tuple(t for t, caps in _TABLE.items() if caps.norm_head_kernels) == mem.NORM_HEAD_KERNEL_DEVICES
    model = {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "seq_length": 128,
             "intermediate_size": 160}
    half = dict(model, param_init_type="float16", compute_dtype="float16")
    for run_mode in ("finetune", "predict"):
        assert "lm_head norm temporaries" not in mem.plan(model, run_mode=run_mode, device="CPU").parts
        assert mem.plan(half, run_mode=run_mode, device="CPU").parts["lm_head norm temporaries"] == 1000 * 64 * 2
        assert mem.plan(model, run_mode=run_mode, device="Ascend").parts["lm_head norm temporaries"] == 1000 * 64 * 4
    assert mem.norm_head_kernels(mem._Shape.from_config(model), "CPU")


def test_lora_trains_only_adapters_and_mp_pp_split():
    full, lora = plan_yaml("7b_910b"), plan_yaml("7b_lora_910b")
    # rank 1 on wq/wk/wv: 32 layers x 3 x (4096 + 4096) elements, fp16 gradients and fp32 moments,
    # both sliced over data_parallel 8 by the parallel optimizer.
    assert lora.parts["gradients"] == 32 * 3 * 8192 * 2 // 8
    assert lora.parts["optimizer states (m, v)"] == 2 * 32 * 3 * 8192 * 4 // 8
    assert full.parts["gradients"] > 1000 * lora.parts["gradients"]
    one = plan_yaml("13b_910b", parallel={"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1})
    split = plan_yaml("13b_910b")            # dp1 mp2 pp4: 10 layers per stage, weights / 2
    assert split.parts["gradients"] < one.parts["gradients"] / 4


def test_recompute_and_micro_batches_in_flight():
    no_recompute = plan_yaml("7b_910b", recompute=False)
    recompute = plan_yaml("7b_910b", recompute=True)
    assert no_recompute.parts["activations"] > 5 * recompute.parts["activations"]
    one = plan_yaml("13b_910b", parallel={"micro_batch_num": 4})
    assert one.layout["largest_stage"] == 0 and "4 micro batches in flight" in " ".join(one.judgements)


ONE_CARD = {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1}


def test_checkpoint_loading_full_copy_or_streamed():
    """7B chat on a 24 GB CPU host: ``mindspore.load_checkpoint`` holds a full copy of the weights next to the
    network (``True`` / ``CHECKPOINT_COPY``); the streaming loader one tensor, the fp16 V x h embedding."""
    def chat(load_checkpoint, **parallel):
        return plan_yaml("7b_910b", "predict", 24 * GIB, dict(ONE_CARD, **parallel), device="CPU", use_past=True,
                         load_checkpoint=load_checkpoint)
    running = chat(False)
    extras = running.per_device_bytes - running.parts["weights"] - running.parts["framework / workspace"]
    copy, stream = chat(True), chat(mem.CHECKPOINT_STREAM)
    assert chat(mem.CHECKPOINT_COPY).parts == copy.parts
    assert copy.parts["checkpoint being loaded"] == running.parts["weights"] - extras
    largest = 125696 * 4096 * 2                        # the fp16 embedding (and lm_head): 0.96 GB
    # The run's other parts (the lm_head norm temporary alone is V x h) exceed it: running is the peak.
    assert stream.parts["checkpoint being loaded"] == max(0, largest - extras) == 0
    assert stream.per_device_bytes == running.per_device_bytes and stream.fits and not copy.fits
    assert "largest single tensor" in " ".join(stream.judgements)
    # With mp 2 on Ascend the run's head temporary is V/2 x h, while a complete checkpoint's tensor is V x h.
    split = plan_yaml("13b", "predict", ATLAS_800, {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1},
                      use_past=True, load_checkpoint=mem.CHECKPOINT_STREAM)
    split_running = plan_yaml("13b", "predict", ATLAS_800,
                              {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1}, use_past=True)
    split_extras = split_running.per_device_bytes - split_running.parts["weights"] - \
        split_running.parts["framework / workspace"]
    assert split.parts["checkpoint being loaded"] == 125696 * 5120 * 2 - split_extras > 0
    with pytest.raises(mem.MemoryConfigError, match="load_checkpoint 'lazy'"):
        chat("lazy")


def test_preflight_counts_the_copy_unless_told_the_checkpoint_streams():
    config = yaml_config("7b_910b")
    config["parallel_config"] = dict(config.parallel_config, **ONE_CARD)
    config["load_checkpoint"] = "/path/to/Baichuan2-7B-Chat.ckpt"
    config["context"] = dict(config.context, device_target="CPU")
    copy, stream = (mem.plan_from_config(config, run_mode="predict", device_memory_bytes=24 * GIB, use_past=True,
                                         load_checkpoint=load)
                    for load in (mem.CHECKPOINT_COPY, mem.CHECKPOINT_STREAM))
    ok, message = mem.preflight(config, "predict", available_bytes=24 * GIB, use_past=True)   # the config names one
    assert not ok and f"needs {copy.per_device_bytes / GIB:.1f} GB host RAM" in message
    ok, message = mem.preflight(config, "predict", available_bytes=24 * GIB, use_past=True,
                                load_checkpoint=mem.CHECKPOINT_STREAM)
    assert ok and f"needs {stream.per_device_bytes / GIB:.1f} GB host RAM" in message


# ----- the original's hardware matrix (facts: MindFormers Baichuan2 documentation) --------------------

# (yaml, run_mode, device memory, parallel overrides, expected verdict)
ORIGINAL_RUNS = [
    ("7b", "finetune", ATLAS_800, None),             # 7B full fine-tune, 2 x 8 Atlas 800: dp2 mp4 pp2
    ("13b", "finetune", ATLAS_800, None),            # 13B full fine-tune, 2 x 8 Atlas 800: dp1 mp8 pp2
    ("7b_910b", "finetune", ATLAS_800T_A2, None),    # 7B full fine-tune, 1 x 8 A2: dp8
    ("7b_4096_910b", "finetune", 60 * GIB, None),    # 7B seq 4096, flash attention, no recompute
    ("13b_910b", "finetune", ATLAS_800T_A2, None),   # 13B full fine-tune, 1 x 8 A2: dp1 mp2 pp4
    ("13b_4096_910b", "finetune", ATLAS_800T_A2, None),
    ("7b_lora_910b", "finetune", ATLAS_800T_A2, None),
    ("13b_lora_910b", "finetune", ATLAS_800T_A2, None),
    ("7b_lora_910b", "finetune", ATLAS_800, None),   # 7B LoRA on one Atlas 800 node (doc: 31GB)
    ("13b_lora_910b", "finetune", ATLAS_800,         # 13B LoRA on Atlas 800: doc dp2 mp1 pp4 mb4, 31GB
     {"data_parallel": 2, "model_parallel": 1, "pipeline_stage": 4, "micro_batch_num": 4}),
    ("7b", "predict", ATLAS_800, {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1}),
    ("7b_910b", "predict", ATLAS_800T_A2, {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1}),
    ("13b_910b", "predict", ATLAS_800T_A2, {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1}),
    ("13b", "predict", ATLAS_800, {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1}),
]


@pytest.mark.parametrize("name, run_mode, memory, parallel", ORIGINAL_RUNS)
def test_every_layout_the_original_ran_fits(name, run_mode, memory, parallel):
    plan = plan_yaml(name, run_mode, memory, parallel, use_past=True if run_mode == "predict" else None)
    assert plan.fits, (name, run_mode, plan.per_device_bytes / GIB, plan.parts)


def test_weights_grads_and_moments_beyond_the_device_do_not_fit():
    """13B on one node of 8 x 32 GB with the A2 layout (dp8): the gathered fp16 weights (25.9 GB) and the
    moment slices alone exceed 31 GB; the planner says so and names a change that fits."""
    plan = plan_yaml("13b", "finetune", ATLAS_800,
                     {"data_parallel": 8, "model_parallel": 1, "pipeline_stage": 1, "micro_batch_num": 1})
    static = plan.parts["weights"] + plan.parts["gradients"] + plan.parts["optimizer states (m, v)"]
    assert static > ATLAS_800 and not plan.fits
    assert plan.suggestions and all(s.endswith("GB") for s in plan.suggestions)
    # Without the parallel optimizer (plain data parallel) even 7B's 15 + 15 + 60 GB cannot fit.
    plan = plan_yaml("7b", "finetune", ATLAS_800,
                     {"data_parallel": 8, "model_parallel": 1, "pipeline_stage": 1, "micro_batch_num": 1},
                     parallel_optimizer=False)
    assert plan.parts["weights"] + plan.parts["gradients"] > ATLAS_800 / 2 and not plan.fits


def test_7b_full_finetune_on_one_atlas_800_node_is_within_the_judgement_margin():
    """The original needs >= 2 Atlas 800 nodes for 7B; with dp8 on one node the planner's margin is smaller
    than its judgement figures (workspace, logits buffers), so the arithmetic cannot promise one node."""
    plan = plan_yaml("7b", "finetune", ATLAS_800,
                     {"data_parallel": 8, "model_parallel": 1, "pipeline_stage": 1, "micro_batch_num": 1})
    judged = plan.parts["framework / workspace"] + plan.parts["logits / loss"]
    assert abs(plan.margin_bytes) < judged
    assert not plan_yaml("7b", "finetune", ATLAS_800,
                         {"data_parallel": 8, "model_parallel": 1, "pipeline_stage": 1, "micro_batch_num": 1},
                         recompute=False).fits


def test_13b_inference_on_one_atlas_800_card_is_the_tight_case():
    """~26 GB of fp16 weights in 31 GB: the arithmetic leaves a thin margin, which the workspace,
    graph memory and fragmentation decide (the original used 2 cards)."""
    plan = plan_yaml("13b", "predict", ATLAS_800, {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1},
                     use_past=True)
    assert plan.parts["weights"] > 25 * GIB
    assert abs(plan.margin_bytes) < 0.15 * ATLAS_800


def test_suggestions_fit_when_applied():
    plan = plan_yaml("7b_4096_910b", "finetune", 40 * GIB)
    assert not plan.fits and plan.suggestions
    if any(s.startswith("recompute: True") for s in plan.suggestions):
        assert plan_yaml("7b_4096_910b", "finetune", 40 * GIB, recompute=True).fits


# ----- pre-flight and CLI ---------------------------------------------------------------------------

def test_preflight_names_needed_available_biggest_and_fix():
    config = yaml_config("13b")
    config["parallel_config"] = dict(config.parallel_config, data_parallel=8, model_parallel=1, pipeline_stage=1)
    ok, message = mem.preflight(config, "finetune")
    assert not ok
    assert "needs" in message and "31.0 GB available" in message and "biggest:" in message and "try:" in message
    assert "\n" not in message
    ok, message = mem.preflight(yaml_config("7b_cpu_tiny"), "finetune", available_bytes=8 * GIB)
    assert ok and "8.0 GB available" in message and "host RAM" in message


def run_cli(*args):
    return subprocess.run([sys.executable, PLAN_SCRIPT, *args], capture_output=True, text=True, check=False)


def test_cli_json_and_table():
    result = run_cli("--config", os.path.join(PLUGIN, "run_baichuan2_13b_910b.yaml"), "--run_mode", "finetune",
                     "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["fits"] is True and isinstance(out["per_device_bytes"], int)
    assert out["device_memory_bytes"] == 59 * GIB
    result = run_cli("--config", os.path.join(PLUGIN, "run_baichuan2_13b.yaml"), "--dp", "8", "--mp", "1",
                     "--pp", "1", "--device_memory", "32GB")
    assert result.returncode == 0 and "does not fit" in result.stdout and "judgements" in result.stdout


def test_cli_load_checkpoint_copy_versus_stream():
    """7B chat on a 24 GB host: refused with a full copy while loading, fits when the .ckpt streams."""
    def planned(loading):
        result = run_cli("--config", os.path.join(PLUGIN, "run_baichuan2_7b_910b.yaml"), "--run_mode", "predict",
                         "--device_target", "CPU", "--use_past", "True", "--device_memory", "24GB",
                         "--load_checkpoint", loading, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    copy, stream, true = planned("copy"), planned("stream"), planned("True")
    assert copy == true and not copy["fits"] and stream["fits"]
    # a copy peaks at two sets of weights beside the framework (the run's other parts fit inside the second),
    # streaming holds one tensor in flight (the 125696 x 4096 fp16 embedding) instead
    parts = copy["parts"]
    assert copy["per_device_bytes"] == 2 * parts["weights"] + parts["framework / workspace"]
    assert stream["parts"]["checkpoint being loaded"] <= 125696 * 4096 * 2


@pytest.mark.parametrize("args", [("--config", "missing.yaml"), ("--config", "x.yaml", "--dp", "0"),
                                  ("--config", "x.yaml", "--load_checkpoint", "maybe"),
                                  ("--device_memory", "lots", "--config", "x.yaml"),
                                  ("--config", os.path.join(PLUGIN, "run_baichuan2_7b.yaml"), "--mp", "3")])
def test_cli_errors_are_one_line(args):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan_memory.py: error: ")


# ----- CPU validation: plan against measured peak RSS -----------------------------------------------

TINY = {"vocab": 125696, "hidden": 256, "layers": 1, "heads": 4, "ffn": 768, "seq": 128, "batch": 1}
SMALL = {"vocab": 125696, "hidden": 512, "layers": 2, "heads": 8, "ffn": 1536, "seq": 256, "batch": 1}
# Long sequence, many heads, small vocabulary: the attention's probabilities, its shared mask and its backward
# working set are most of the memory (the other cases are dominated by the 125696-word head).
LONG = {"vocab": 4096, "hidden": 256, "layers": 2, "heads": 16, "ffn": 768, "seq": 1024, "batch": 1}
VALIDATION_CASES = [(SMALL, "finetune"), (SMALL, "predict"), (SMALL, "predict_cache"), (TINY, "finetune"),
                    (TINY, "lora"), (SMALL, "lora"), (LONG, "finetune")]


@pytest.fixture(scope="module")
def measurements():
    import bench_memory  # pylint: disable=import-outside-toplevel
    # Two at a time: each process measures its own baseline and peak, so they do not disturb each other.
    results = bench_memory.run_cases(VALIDATION_CASES, max_parallel=2)
    print("\n" + bench_memory.table(results))          # shown with pytest -s
    return results


@pytest.mark.parametrize("index", range(len(VALIDATION_CASES)))
def test_plan_within_15_percent_of_measured_peak(measurements, index):
    """The issue's bound: |planned - measured| <= 15% of the measured peak anonymous memory (RssAnon)
    above the baseline the same process measured (MindSpore + MindFormers imported and a toy run of the
    same case)."""
    import bench_memory  # pylint: disable=import-outside-toplevel
    result = measurements[index]
    assert result["measured_bytes"] > 0.3 * GIB        # memory dominates noise at these shapes
    assert abs(result["relative_error"]) <= bench_memory.TOLERANCE, bench_memory.table([result])
