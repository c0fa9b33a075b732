"""baichuan2_ckpt_layout + mindformers/tools/transform_ckpt.py: split per dp/mp/pp and merge back, bit-exact."""
from collections import OrderedDict
import os
import subprocess
import sys

import numpy as np
import pytest

import baichuan2_ckpt_layout as lay

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSFORM = os.path.join(ROOT, "mindformers", "tools", "transform_ckpt.py")
V, H, I, L = 32, 8, 16, 4          # tiny vocab / hidden / FFN / layers


def tiny_params(seed=0):
    """A complete checkpoint with the real parameter names (design.md), optimizer state and a counter."""
    rng = np.random.default_rng(seed)
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    def rand(*shape, dtype=np.float16):
        return rng.standard_normal(shape).astype(dtype)
    params = OrderedDict()
    params["model.tok_embeddings.embedding_weight"] = rand(V, H)
    for i in range(L):
        prefix = f"model.layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            params[f"{prefix}attention.{name}.weight"] = rand(H, H)
        params[f"{prefix}feed_forward.w1.weight"] = rand(I, H)
        params[f"{prefix}feed_forward.w2.weight"] = rand(H, I)
        params[f"{prefix}feed_forward.w3.weight"] = rand(I, H)
        params[f"{prefix}attention_norm.weight"] = rand(H, dtype=np.float32)
        params[f"{prefix}ffn_norm.weight"] = rand(H, dtype=np.float32)
    params["model.layers.0.attention.wq.mindpet_delta_lora_a"] = rand(2, H, dtype=np.float32)
    params["model.layers.0.attention.wq.mindpet_delta_lora_b"] = rand(H, 2, dtype=np.float32)
    params["model.norm_out.weight"] = rand(H, dtype=np.float32)
    params["lm_head.weight"] = ms.Tensor(rand(V, H, dtype=np.float32), ms.bfloat16).asnumpy()
    params["adam_m.model.layers.3.attention.wo.weight"] = rand(H, H, dtype=np.float32)
    params["adam_v.lm_head.weight"] = rand(V, H, dtype=np.float32)
    params["global_step"] = np.array([7], np.int32)
    return params


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    path = tmp_path_factory.mktemp("complete") / "baichuan2_tiny.ckpt"
    lay.save_ckpt(tiny_params(), str(path))
    return path


def assert_same(first, second):
    assert list(first) == list(second)
    for name in first:
        assert lay.same_bits(first[name], second[name]), name


def test_split_contents_dp2_mp2_pp2(complete, tmp_path):
    layout = lay.Layout(2, 2, 2, L)
    files = lay.split_to_dir(lay.load_ckpt(str(complete)), str(tmp_path), layout)
    assert files == [str(tmp_path / f"rank_{r}" / f"checkpoint_{r}.ckpt") for r in range(8)]
    full = tiny_params()
    rank = [lay.load_ckpt(f) for f in files]
    # stage 0 = ranks 0..3 (layers 0, 1 and the embedding), stage 1 = ranks 4..7 (layers 2, 3, norm_out, lm_head)
    assert {n.split(".")[2] for n in rank[0] if n.startswith("model.layers.")} == {"0", "1"}
    assert {n.split(".")[2] for n in rank[5] if n.startswith("model.layers.")} == {"2", "3"}
    assert "lm_head.weight" not in rank[0] and "model.norm_out.weight" in rank[4]
    assert "model.tok_embeddings.embedding_weight" not in rank[4]
    assert all("global_step" in r for r in rank)
    # mp: column weights split on dim 0, row weights on dim 1, norms and (vocab_emb_dp) the embedding whole
    for mp_index, r in ((0, 0), (1, 1)):
        part = slice(mp_index * H // 2, (mp_index + 1) * H // 2)
        ffn = slice(mp_index * I // 2, (mp_index + 1) * I // 2)
        for name, index in (("attention.wq.weight", part), ("attention.wo.weight", (slice(None), part)),
                            ("attention.wq.mindpet_delta_lora_b", part), ("feed_forward.w3.weight", ffn),
                            ("feed_forward.w2.weight", (slice(None), ffn))):
            layer = "0" if "lora" in name else "1"
            key = f"model.layers.{layer}.{name}"
            assert np.array_equal(rank[r][key], full[key][index]), key
    assert lay.same_bits(rank[1]["model.layers.0.attention_norm.weight"], full["model.layers.0.attention_norm.weight"])
    assert lay.same_bits(rank[1]["model.layers.0.attention.wq.mindpet_delta_lora_a"],
                         full["model.layers.0.attention.wq.mindpet_delta_lora_a"])
    assert rank[1]["model.tok_embeddings.embedding_weight"].shape == (V, H)
    assert lay.same_bits(rank[5]["lm_head.weight"], full["lm_head.weight"][V // 2:])           # bf16 kept
    assert lay.same_bits(rank[7]["adam_v.lm_head.weight"], full["adam_v.lm_head.weight"][V // 2:])
    assert rank[6]["adam_m.model.layers.3.attention.wo.weight"].shape == (H, H // 2)
    # dp replicas: rank 2 = (stage 0, dp 1, mp 0) holds the same bytes as rank 0
    assert_same(rank[0], rank[2])


def test_split_merge_round_trip_is_bit_exact(complete, tmp_path):
    source = lay.load_ckpt(str(complete))
    for dp, mp, pp in ((2, 2, 2), (1, 2, 4), (1, 4, 1), (3, 1, 1)):
        folder = tmp_path / f"d{dp}m{mp}p{pp}"
        lay.split_to_dir(source, str(folder), lay.Layout(dp, mp, pp, L))
        merged = lay.load_complete(str(folder))
        assert_same(merged, source)
    out = tmp_path / "merged.ckpt"
    lay.save_ckpt(lay.load_complete(str(tmp_path / "d2m2p2")), str(out))
    assert out.read_bytes() == complete.read_bytes()


def test_embedding_split_when_vocab_emb_dp_is_false(complete, tmp_path):
    layout = lay.Layout(1, 2, 1, L, vocab_emb_dp=False)
    files = lay.split_to_dir(lay.load_ckpt(str(complete)), str(tmp_path), layout)
    assert lay.load_ckpt(files[1])["model.tok_embeddings.embedding_weight"].shape == (V // 2, H)
    assert_same(lay.load_complete(str(tmp_path)), lay.load_ckpt(str(complete)))


def test_layout_to_layout_and_single_rank(complete, tmp_path):
    lay.transform(str(complete), str(tmp_path / "a"), 2, 2, 2)
    files = lay.transform(str(tmp_path / "a"), str(tmp_path / "b"), 1, 4, 1)       # merge + split in one go
    direct = lay.transform(str(complete), str(tmp_path / "c"), 1, 4, 1)
    for first, second in zip(files, direct):
        assert_same(lay.load_ckpt(first), lay.load_ckpt(second))
    path = lay.checkpoint_for_rank(str(complete), str(tmp_path / "out"), 1, 4, 1, rank_id=2)
    assert path == str(tmp_path / "out" / "transformed_checkpoint" / "baichuan2_tiny" / "rank_2" / "checkpoint_2.ckpt")
    assert sorted(os.listdir(os.path.dirname(os.path.dirname(path)))) == ["layout.json", "rank_2"]
    assert_same(lay.load_ckpt(path), lay.load_ckpt(direct[2]))


def test_errors(complete, tmp_path):
    source = lay.load_ckpt(str(complete))
    with pytest.raises(lay.LayoutError,
                       match=r"model.layers.0.attention.wq.weight of shape \(8, 8\) cannot be split in 3"):
        lay.split_params(source, lay.Layout(1, 3, 1, L))
    with pytest.raises(lay.LayoutError, match="num_layers 4 is less than pipeline stages 8"):
        lay.Layout(1, 1, 8, L)
    folder = tmp_path / "split"
    lay.split_to_dir(source, str(folder), lay.Layout(2, 1, 1, L))
    os.remove(folder / "rank_1" / "checkpoint_1.ckpt")
    tampered = OrderedDict(source)
    tampered["model.norm_out.weight"] = tampered["model.norm_out.weight"] + 1
    lay.save_ckpt(tampered, str(folder / "rank_1" / "checkpoint_1.ckpt"))
    with pytest.raises(lay.LayoutError, match=r"model.norm_out.weight: rank 1 \(stage 0, dp 1, mp 0\) differs"):
        lay.load_complete(str(folder))
    lay.save_ckpt(source, str(folder / "rank_1" / "other.ckpt"))
    with pytest.raises(lay.LayoutError, match="holds 2 checkpoints"):
        lay.load_complete(str(folder))
    os.remove(folder / "layout.json")
    with pytest.raises(lay.LayoutError, match="no layout.json: give its layout"):
        lay.load_complete(str(folder))
    with pytest.raises(lay.LayoutError, match=r"needs rank_0..rank_3; missing \[2, 3\]"):
        lay.read_layout_dir(str(folder), lay.Layout(4, 1, 1, L))
    with pytest.raises(FileNotFoundError, match="source checkpoint not found"):
        lay.load_complete(str(tmp_path / "nothing"))


def run_cli(args, cwd):
    return subprocess.run([sys.executable, TRANSFORM, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "GLOG_v": "3"})


def test_cli_split_and_merge(complete, tmp_path):
    result = run_cli(["--src_ckpt_dir", str(complete), "--dst_ckpt_dir", "dist", "--dst_dp", "2", "--dst_mp", "2",
                      "--dst_pp", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "dist")) == ["layout.json"] + [f"rank_{r}" for r in range(8)]
    result = run_cli(["--src_ckpt_dir", "dist", "--dst_ckpt_dir", "full", "--merge"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "full" / "rank_0" / "checkpoint_0.ckpt").read_bytes() == complete.read_bytes()


def test_cli_errors_are_one_line(tmp_path):
    result = run_cli(["--src_ckpt_dir", "x.ckpt", "--dst_ckpt_dir", "out"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("transform_ckpt.py: error: no destination layout") and result.stderr.count("\n") == 1
    result = run_cli(["--src_ckpt_dir", "x", "--dst_ckpt_dir", "out", "--dst_ckpt_strategy", "s.ckpt",
                      "--dst_mp", "2"], tmp_path)
    assert result.returncode == 2 and "not both" in result.stderr
