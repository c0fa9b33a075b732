"""baichuan2_parallel: pipeline stage assignment (as MindFormers r1.0 ``mindformers/models/llama/llama.py``) and the up-front layout checks."""
import pytest

from baichuan2_parallel import ParallelConfigError, layer_to_stage, stage_layers, validate_parallel_config

MODEL_7B = {"num_layers": 32, "num_heads": 32, "vocab_size": 125696, "hidden_size": 4096,
            "intermediate_size": 11008, "offset": 0, "batch_size": 1}
MODEL_13B = {"num_layers": 40, "num_heads": 40, "vocab_size": 125696, "hidden_size": 5120,
             "intermediate_size": 13696, "offset": 0, "batch_size": 1}


def counts(num_layers, pp, offset=0):
    return [len(ids) for ids in stage_layers(num_layers, pp, offset)]


def test_7b_pp2_splits_at_16():
    assert [layer_to_stage(i, 32, 2) for i in (0, 15, 16, 31)] == [0, 0, 1, 1]
    assert counts(32, 2) == [16, 16]


def test_13b_stage_sizes():
    assert counts(40, 4) == [10, 10, 10, 10]
    assert counts(40, 2) == [20, 20]
    assert stage_layers(40, 4)[3] == list(range(30, 40))


def test_stage_rule_edges():
    assert counts(32, 1) == [32]
    assert counts(5, 4) == [1, 1, 1, 2]            # int(6/4) = 1 layer per stage, the rest on the last
    assert counts(32, 2, offset=2) == [14, 18]     # offset shifts layers towards later stages
    with pytest.raises(ParallelConfigError, match="offset must be an integer"):
        layer_to_stage(0, 32, 2, offset=[1, -1])


@pytest.mark.parametrize("model, parallel, ranks", [
    (MODEL_7B, {"data_parallel": 2, "model_parallel": 4, "pipeline_stage": 2, "micro_batch_num": 8}, 16),
    (MODEL_7B, {"data_parallel": 8, "model_parallel": 1, "pipeline_stage": 1, "micro_batch_num": 8}, 8),
    (MODEL_13B, {"data_parallel": 1, "model_parallel": 8, "pipeline_stage": 2, "micro_batch_num": 16}, 16),
    (MODEL_13B, {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 4, "micro_batch_num": 16}, 8),
])
def test_the_original_yaml_layouts_pass_on_ascend(model, parallel, ranks):
    dp, mp, pp, _ = validate_parallel_config(parallel, model, ranks, "Ascend", 2)
    assert dp * mp * pp == ranks


def test_data_parallel_passes_on_cpu():
    assert validate_parallel_config({"data_parallel": 2}, MODEL_7B, 2, "CPU", 2) == (2, 1, 1, 1)


def check(parallel, ranks, model=MODEL_7B, device="Ascend", batch=2, run_mode=None):
    return validate_parallel_config(parallel, model, ranks, device, batch, run_mode=run_mode)


@pytest.mark.parametrize("parallel, ranks, model, device, batch, run_mode, message", [
    ({"data_parallel": 2, "model_parallel": 4, "pipeline_stage": 2, "micro_batch_num": 8}, 8, MODEL_7B, "Ascend",
     2, None, "data_parallel 2 x model_parallel 4 x pipeline_stage 2 = 16 devices, but RANK_SIZE is 8"),
    ({"data_parallel": 1, "model_parallel": 3}, 3, MODEL_7B, "Ascend", 2, None,
     "num_heads 32 is not divisible by model_parallel 3"),
    ({"data_parallel": 1, "model_parallel": 4}, 4, {**MODEL_7B, "vocab_size": 125698}, "Ascend", 2, None,
     "vocab_size 125698 is not divisible by model_parallel 4"),
    ({"data_parallel": 1, "model_parallel": 8}, 8, {**MODEL_7B, "intermediate_size": 11004}, "Ascend", 2, None,
     r"intermediate_size\) 11004 is not divisible by model_parallel 8"),
    ({"pipeline_stage": 4, "micro_batch_num": 4}, 4, {**MODEL_7B, "num_layers": 3}, "Ascend", 2, None,
     "num_layers 3 is less than pipeline_stage 4"),
    ({"pipeline_stage": 2, "micro_batch_num": 4}, 2, {**MODEL_7B, "num_layers": 2, "offset": 1}, "Ascend", 2, None,
     r"stage\(s\) \[0\] get no layer"),
    ({"pipeline_stage": 4, "micro_batch_num": 2}, 4, MODEL_13B, "Ascend", 2, None,
     "micro_batch_num 2 is less than pipeline_stage 4"),
    ({"data_parallel": 2}, 2, MODEL_7B, "Ascend", 0, None, "runner_config.batch_size must be a positive integer"),
    ({"data_parallel": 2}, 2, {**MODEL_7B, "batch_size": 3}, "Ascend", 2, "predict",
     "model_config.batch_size 3 .* is not divisible by data_parallel 2"),
    ({"pipeline_stage": 2, "micro_batch_num": 2}, 2, MODEL_7B, "Ascend", 2, "predict",
     "distributed predict does not support pipeline parallel"),
    ({"data_parallel": 0}, 1, MODEL_7B, "Ascend", 2, None, "data_parallel must be a positive integer, got 0"),
    ({"data_parallel": 1, "model_parallel": 2}, 2, MODEL_7B, "CPU", 2, None,
     "model_parallel 2 cannot run on MindSpore's CPU backend"),
    ({"data_parallel": 1, "pipeline_stage": 2, "micro_batch_num": 2}, 2, MODEL_7B, "CPU", 2, None,
     "pipeline_stage 2 cannot run on MindSpore's CPU backend"),
    ({"data_parallel": 2}, 4, MODEL_7B, "CPU", 2, None, "= 2 devices, but RANK_SIZE is 4"),
])
def test_validation_errors_name_the_numbers(parallel, ranks, model, device, batch, run_mode, message):
    with pytest.raises(ParallelConfigError, match=message):
        check(parallel, ranks, model, device, batch, run_mode)


def test_works_with_mindformer_config_objects():
    from mindformers import MindFormerConfig  # pylint: disable=import-outside-toplevel
    parallel = MindFormerConfig(**{"data_parallel": 2, "model_parallel": 1, "pipeline_stage": 1,
                                   "micro_batch_num": 1})
    model = MindFormerConfig(**{k: v for k, v in MODEL_7B.items() if k != "intermediate_size"},
                             multiple_of=256, intermediate_size=None)
    assert validate_parallel_config(parallel, model, 2, "CPU", 4) == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="RANK_SIZE is 1"):
        validate_parallel_config(parallel, model, 1, "CPU", 4)
