"""Checkpoint and config I/O: round trips with transformers, strictness, bad input."""
import json

import pytest
import torch
from hf_oracle import load_hf
from safetensors.torch import load_file, save_file

import blockdiff
from blockdiff.checkpoint import CheckpointError
from blockdiff.config import ConfigError, ModelConfig
from blockdiff.model.init import init_weights
from blockdiff.random_model import create_random_model, tiny_config


def test_blockdiff_checkpoint_loads_in_transformers(tmp_path):
    path = create_random_model(tmp_path / "m", tiny_config(vocab_size=300), seed=3)
    ours = blockdiff.load_model(path)
    hf = load_hf(path)
    prompt = torch.randint(3, 300, (2, 70))            # longer than the 64-token sliding window
    canvas = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ref = hf(input_ids=prompt, decoder_input_ids=canvas).logits
    assert (ours.block_logits(prompt, canvas) - ref).abs().max().item() < 1e-4


def test_transformers_round_trip_keeps_every_tensor(hf_dirs, tmp_path):
    hf, path = hf_dirs["spec"]
    ours = blockdiff.load_model(path)
    ours.save_pretrained(tmp_path / "rt")
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "rt" / "model.safetensors")
    assert set(saved) == set(original)                 # vision tensors loaded and written back, no extra keys
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    again = json.loads((tmp_path / "rt" / "config.json").read_text())
    first = json.loads((path / "config.json").read_text())
    assert again["text_config"] == first["text_config"] and again["vision_config"] == first["vision_config"]


def test_random_weights_do_not_depend_on_the_default_device():
    """`bench` builds models under `with torch.device(DEVICE)`: the CPU generator's samples must stay
    on the CPU there (a CUDA default device once failed with a generator-device mismatch)."""
    expected = init_weights(blockdiff.DiffusionGemma(tiny_config()), seed=2)
    model = blockdiff.DiffusionGemma(tiny_config())
    with torch.device("meta"):                         # any default device other than the CPU
        init_weights(model, seed=2)
    for (name, a), (_, b) in zip(expected.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_weight_files_take_the_umask_not_a_private_mode(tmp_path):
    """safetensors writes 0o600 files; checkpoints and packs get the mode of any new file (here 0o640)."""
    import os

    from blockdiff.quant.convert import quantize
    old = os.umask(0o027)
    try:
        model = init_weights(blockdiff.DiffusionGemma(tiny_config()), seed=1)
        model.save_pretrained(tmp_path / "m", max_shard_bytes=200_000)
        quantize(tmp_path / "m", tmp_path / "q", "w8a8", progress=False)
    finally:
        os.umask(old)
    files = list((tmp_path / "m").glob("*.safetensors")) + list((tmp_path / "q").glob("*.safetensors"))
    assert len(files) > 2 and {f.stat().st_mode & 0o777 for f in files} == {0o640}


def test_sharded_save_and_load(tmp_path):
    model = init_weights(blockdiff.DiffusionGemma(tiny_config()), seed=1)
    model.save_pretrained(tmp_path / "s", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = blockdiff.load_model(tmp_path / "s")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    hf = load_hf(tmp_path / "s")                          # transformers reads our shards too
    ids, canvas = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (hf(input_ids=ids, decoder_input_ids=canvas).logits - loaded.block_logits(ids, canvas)).abs().max() < 1e-4


def test_bf16_load_and_save(tmp_path):
    path = create_random_model(tmp_path / "m")
    model = blockdiff.load_model(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    assert blockdiff.load_model(tmp_path / "b").dtype == torch.bfloat16


@pytest.fixture
def ckpt(tmp_path):
    return create_random_model(tmp_path / "m")


def test_missing_directory_and_files(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        blockdiff.load_model(tmp_path / "nope")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        blockdiff.load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        blockdiff.load_model(ckpt)


def test_corrupt_safetensors_header(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        blockdiff.load_model(ckpt)


def test_truncated_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        blockdiff.load_model(ckpt)


def _edit(ckpt, fn):
    tensors = load_file(ckpt / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def test_wrong_shape_is_named(ckpt):
    key = "model.decoder.layers.1.self_attn.q_proj.weight"
    _edit(ckpt, lambda t: t.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=f"'{key}' has shape \\[3, 3\\]"):
        blockdiff.load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    key = "model.decoder.layers.0.router.scale"
    _edit(ckpt, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing 1 tensor.*{key}"):
        blockdiff.load_model(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    _edit(ckpt, lambda t: t.__setitem__("model.decoder.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.decoder.layers.0.extra.weight'"):
        blockdiff.load_model(ckpt)
    _edit(ckpt, lambda t: (t.pop("model.decoder.layers.0.extra.weight"), t.__setitem__("foo", torch.zeros(1))))
    with pytest.raises(CheckpointError, match="unexpected tensor 'foo'"):
        blockdiff.load_model(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        blockdiff.load_model(ckpt)


def test_config_errors_name_the_field():
    base = tiny_config().to_dict()
    bad = json.loads(json.dumps(base))
    del bad["text_config"]["num_experts"]
    with pytest.raises(ConfigError, match="num_experts"):
        ModelConfig.from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["text_config"]["hidden_size"] = -4
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["text_config"]["layer_types"] = ["sliding_attention"]
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="text_config"):
        ModelConfig.from_dict({"model_type": "diffusion_gemma"})


def test_config_round_trip_keeps_unknown_fields():
    d = tiny_config().to_dict()
    d["my_field"] = {"a": 1}
    d["text_config"]["use_bidirectional_attention"] = "vision"
    d["eos_token_id"] = [1, 106]
    cfg = ModelConfig.from_dict(d)
    assert cfg.eos_ids == [1, 106]
    assert cfg.to_dict() == d
    assert ModelConfig.from_dict(cfg.to_dict()).to_dict() == d


def test_released_shapes_from_config():
    """The 26B-A4B config (SPEC 1.4) gives the published per-layer shapes on the meta device."""
    cfg = ModelConfig(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                      num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
                      sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704)
    with torch.device("meta"):
        model = blockdiff.DiffusionGemma(cfg)
    assert model.layers[5].self_attn.q_proj.weight.shape == (8192, 2816)
    assert model.layers[5].self_attn.v_proj is None
    assert model.layers[0].self_attn.k_proj.weight.shape == (2048, 2816)
    assert model.layers[0].experts.gate_up_proj.shape == (128, 1408, 2816)
    assert sum(p.numel() for p in model.parameters()) == 25_250_986_752


def test_last_layer_is_forced_to_full_attention_like_transformers():
    with pytest.warns(UserWarning, match="full_attention"):
        cfg = tiny_config(layer_types=["full_attention", "sliding_attention"] * 2)
    assert cfg.layer_types[-1] == "full_attention"
    default = tiny_config(layer_types=None, num_hidden_layers=8)
    assert [i for i, t in enumerate(default.layer_types) if t == "full_attention"] == [5, 7]
