"""The predict CLI and the documentation's generate/pipeline scripts against the PyTorch reference.

Tiny random 7B/13B-shaped models are written as Hugging Face checkpoints, converted with
``convert_weight.py`` and run through the real command lines (subprocesses) with a YAML derived from
the tiny CPU YAMLs. The expected texts are the reference's greedy tokens (HF repetition penalty
applied here on its float64 logits), decoded with the bundled tokenizer: equal ids give equal text,
and the tokenizer decodes deterministically, so comparing the printed text compares the tokens.
"""
import ast
import os
from concurrent.futures import ThreadPoolExecutor
import subprocess
import sys

import numpy as np
import pytest
import yaml

from model_fixtures import tiny_pair
from reference.torch_baichuan2 import TorchBaichuan2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "research", "baichuan2")
VOCAB = os.path.join(PLUGIN, "assets", "tokenizer.model")
EOS = 2

PROMPTS = ["<reserved_106>你是谁？<reserved_107>",
           "<reserved_106>白日依山尽，下一句是？请详细解释这首诗的意境，以及作者王之涣的生平。<reserved_107>",
           "hello world",
           "<reserved_106>《静夜思》作者是？<reserved_107>"]
DOC_PROMPTS = ["<reserved_106>你是谁？<reserved_107>",
               "<reserved_106>《静夜思》作者是？<reserved_107>",
               "<reserved_106>白日依山尽，下一句是？<reserved_107>"]


@pytest.fixture(scope="module")
def tokenizer():
    from baichuan2_tokenizer import Baichuan2Tokenizer
    return Baichuan2Tokenizer(vocab_file=VOCAB)


@pytest.fixture(scope="module", params=["7b", "13b"])
def model(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"predict_{kind}")
    state_dict, hf_config, ckpt = tiny_pair(kind, str(tmp), seed=21)
    return kind, ckpt, TorchBaichuan2(state_dict, hf_config, "rope" if kind == "7b" else "alibi"), tmp


def write_yaml(tmp, kind, name, **model_config):
    """The tiny CPU YAML of ``kind`` with ``model_config`` overrides (None removes a key)."""
    with open(os.path.join(PLUGIN, f"run_baichuan2_{kind}_cpu_tiny.yaml"), encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config["processor"]["tokenizer"]["vocab_file"] = VOCAB
    for key, value in model_config.items():
        if value is None:
            config["model"]["model_config"].pop(key, None)
        else:
            config["model"]["model_config"][key] = value
    path = os.path.join(str(tmp), name)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, allow_unicode=True)
    return path


def reference_greedy(reference, prompt, limit, penalty=1.0, eos=EOS):
    """Greedy ids up to ``limit`` total tokens or eos, with the HF repetition penalty."""
    seq = list(prompt)
    while len(seq) < limit:
        logits = reference.logits([seq])[0, -1].numpy()
        for i in set(seq):
            logits[i] = logits[i] / penalty if logits[i] > 0 else logits[i] * penalty
        token = int(np.argmax(logits))
        seq.append(token)
        if token == eos:
            break
    return seq


def run(script, args, cwd, timeout=600):
    env = dict(os.environ, GLOG_v="3", PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, os.path.join(PLUGIN, script), *args], capture_output=True, text=True,
                          cwd=str(cwd), env=env, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def predict(config, ckpt, cwd, prompts_or_file, *extra):
    data = prompts_or_file if isinstance(prompts_or_file, list) else [prompts_or_file]
    out = run("run_baichuan2.py", ["--config", config, "--run_mode", "predict", "--load_checkpoint", ckpt,
                                   "--device_target", "CPU", "--predict_data", *data, *extra], cwd)
    line = [l for l in out.splitlines() if l.startswith("[{'text_generation_text'")][-1]
    result = ast.literal_eval(line)
    with open(os.path.join(str(cwd), "text_generation_result.txt"), encoding="utf-8") as handle:
        assert ast.literal_eval(handle.read()) == result
    # One dict per pipeline batch (model_config.batch_size prompts with the KV cache), texts in order.
    return [text for item in result for text in item["text_generation_text"]]


def expected_texts(reference, tokenizer, prompts, penalty, limit=None, new_tokens=None, skip_special=True):
    texts = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        total = len(ids) + new_tokens if new_tokens is not None else limit
        texts.append(tokenizer.decode(reference_greedy(reference, ids, total, penalty),
                                      skip_special_tokens=skip_special))
    return texts


def test_predict_cli_matches_reference_and_batches(model, tokenizer):
    """7B: one by one (batch 1, prompts as arguments) == batch 2 (a prompt file) == reference, 20 new tokens
    with repetition_penalty 1.05, KV cache. 13B: no cache, no max_new_tokens in the yaml: --max_length 40."""
    kind, ckpt, reference, tmp = model
    if kind == "7b":
        expected = expected_texts(reference, tokenizer, PROMPTS, 1.05, new_tokens=20)
        single = write_yaml(tmp, kind, "single.yaml", do_sample=False, repetition_penalty=1.05, use_past=True,
                            batch_size=1, max_new_tokens=64)
        prompt_file = os.path.join(str(tmp), "prompts.txt")
        with open(prompt_file, "w", encoding="utf-8") as handle:
            handle.write("\n".join(PROMPTS) + "\n")
        batched_yaml = write_yaml(tmp, kind, "batch2.yaml", do_sample=False, repetition_penalty=1.05,
                                  use_past=True, batch_size=2, max_new_tokens=20)
        os.makedirs(tmp / "run_single", exist_ok=True)
        os.makedirs(tmp / "run_batch", exist_ok=True)
        with ThreadPoolExecutor(2) as pool:                  # two CLI runs side by side (own working dirs)
            single_run = pool.submit(predict, single, ckpt, tmp / "run_single", list(PROMPTS),
                                     "--max_new_tokens", "20")
            batched_run = pool.submit(predict, batched_yaml, ckpt, tmp / "run_batch", prompt_file)
            one_by_one, batched = single_run.result(), batched_run.result()
        assert one_by_one == expected
        assert batched == one_by_one
    else:
        expected = expected_texts(reference, tokenizer, PROMPTS[:2], 1.0, limit=40)
        config = write_yaml(tmp, kind, "nocache.yaml", do_sample=False, repetition_penalty=1.0, use_past=False,
                            max_new_tokens=None)
        assert predict(config, ckpt, tmp, PROMPTS[:2], "--max_length", "40") == expected
    assert all(text.startswith(prompt) for text, prompt in zip(expected, PROMPTS))


def test_doc_generate_and_pipeline_scripts(model, tokenizer):
    """The docs' scripts with their defaults (the docs' three prompts, greedy, max_length 64; penalty from the
    yaml: 1.05 as in the 7B example, 1.0 as in the 13B one)."""
    kind, ckpt, reference, tmp = model
    penalty = 1.05 if kind == "7b" else 1.0
    config = write_yaml(tmp, kind, "doc.yaml", repetition_penalty=penalty, use_past=True, do_sample=True,
                        max_new_tokens=None)
    common = ["--config", config, "--load_checkpoint", ckpt, "--use_parallel", "False", "--device_target", "CPU"]
    expected_ids = [reference_greedy(reference, tokenizer.encode(p), 64, penalty) for p in DOC_PROMPTS]
    script = "run_baichuan2_generate.py" if kind == "7b" else "run_baichuan2_pipeline.py"
    out = run(script, common, tmp)
    if kind == "7b":      # decode(output) as printed by the docs' example: special tokens kept (a final </s>)
        assert out.endswith("".join(tokenizer.decode(ids) + "\n" for ids in expected_ids))
    else:
        results = [ast.literal_eval(line) for line in out.split("\n") if line.startswith("{'text_generation_text'")]
        assert results == [{"text_generation_text": [tokenizer.decode(ids, skip_special_tokens=True)]}
                           for ids in expected_ids]


def test_predict_cli_with_base_and_lora(model, tokenizer):
    """A *_lora yaml + a folder with the base and the LoRA checkpoints: the reference runs the HF weights with
    (alpha / r) B A folded into W_pack."""
    import mindspore as ms
    import torch
    kind, ckpt, reference, tmp = model
    rank, alpha = 2, 16
    h = reference.h
    rng = np.random.RandomState(4)
    folder = tmp / "base_lora"
    os.makedirs(folder, exist_ok=True)
    lora, state = [], dict(reference.w)
    for layer in range(reference.layers):
        w_pack = state[f"model.layers.{layer}.self_attn.W_pack.weight"].clone()
        for part, proj in enumerate(("wq", "wk", "wv")):
            a = rng.normal(0, 0.3, (rank, h)).astype(np.float32)
            b = rng.normal(0, 0.3, (h, rank)).astype(np.float32)
            prefix = f"model.layers.{layer}.attention.{proj}.mindpet_delta_lora_"
            lora += [{"name": prefix + "a", "data": ms.Tensor(a)}, {"name": prefix + "b", "data": ms.Tensor(b)}]
            w_pack[part * h:(part + 1) * h] += torch.from_numpy(alpha / rank * (b @ a)).to(w_pack.dtype)
        state[f"model.layers.{layer}.self_attn.W_pack.weight"] = w_pack
    ms.save_checkpoint(lora, str(folder / "lora.ckpt"))
    os.link(ckpt, folder / "base.ckpt")
    config = write_yaml(tmp, kind, "lora.yaml", do_sample=False, repetition_penalty=1.0, use_past=True,
                        max_new_tokens=16, pet_config={"pet_type": "lora", "lora_rank": rank, "lora_alpha": alpha,
                                                       "lora_dropout": 0.1, "target_modules": ".*wq|.*wk|.*wv"})
    merged = TorchBaichuan2(state, {"hidden_size": h, "num_attention_heads": reference.heads,
                                    "num_hidden_layers": reference.layers, "rms_norm_eps": reference.eps},
                            reference.position)
    expected = expected_texts(merged, tokenizer, PROMPTS[:1], 1.0, new_tokens=16)
    assert expected != expected_texts(reference, tokenizer, PROMPTS[:1], 1.0, new_tokens=16)
    assert predict(config, str(folder), tmp, PROMPTS[:1]) == expected
