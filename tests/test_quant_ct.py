"""The compressed-tensors layout, proven with the `compressed-tensors` package itself: its
decompression of blockdiff's packs equals blockdiff's dequantization, and packs that it writes
(W8A8, W4A16, FP8-dynamic) load in blockdiff and compute with the weights it decompresses."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import blockdiff
from blockdiff.hf_layout import to_checkpoint
from blockdiff.quant.convert import quantize
from blockdiff.quant.ct_config import QuantConfig
from blockdiff.quant.scheme import dequantize_weight, unpack_int4
from blockdiff.random_model import create_random_model, tiny_config

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402


def tensors_of(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        with safe_open(str(path / file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_compressed_tensors_decompresses_our_packs_to_our_weights(tmp_path):
    src = create_random_model(tmp_path / "src", seed=4, dtype=torch.bfloat16)
    pack = quantize(src, tmp_path / "q", "w4a16-experts", progress=False)
    raw = json.loads((pack / "config.json").read_text())["quantization_config"]
    theirs = QuantizationConfig.model_validate(raw)          # the package accepts the config as written
    ours, tensors = QuantConfig.from_dict(raw), tensors_of(pack)
    modules = sorted({k.rpartition(".")[0] for k in tensors if k.endswith(".weight_scale")})
    assert any(".experts.3.up_proj" in m for m in modules) and any("self_attn.o_proj" in m for m in modules)
    for module in modules:
        group = next(g for g in theirs.config_groups.values()
                     if any(t == "Linear" or (t.startswith("re:") and re.match(t[3:], module))
                            for t in g.targets))
        local = {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".")}
        args = ours.args_for(module)
        if args.bits == 4:
            decompressed = PackedQuantizationCompressor.decompress(local, group)["weight"]
            mine = dequantize_weight(unpack_int4(local["weight_packed"], int(local["weight_shape"][1])) - 8,
                                     local["weight_scale"])
        else:
            decompressed = IntQuantizationCompressor.decompress(local, group)["weight"]
            mine = dequantize_weight(local["weight"], local["weight_scale"])
        assert decompressed.dtype == mine.dtype == torch.bfloat16
        assert torch.equal(decompressed, mine), module


PRESETS = {
    "W8A8": dict(weights=dict(num_bits=8, type="int", strategy="channel"),
                 input_activations=dict(num_bits=8, type="int", strategy="token", dynamic=True)),
    "W4A16": dict(weights=dict(num_bits=4, type="int", strategy="group", group_size=32)),
    "FP8_DYNAMIC": dict(weights=dict(num_bits=8, type="float", strategy="channel"),
                        input_activations=dict(num_bits=8, type="float", strategy="token", dynamic=True)),
}


def ct_pack(src, out, preset):
    """Quantize blockdiff checkpoint `src` with compressed-tensors itself (min-max calibration, as
    llm-compressor's default observer) and save it the way llm-compressor does."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = blockdiff.load_model(src)
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.decoder = model                     # module names = checkpoint names
    scheme = QuantizationScheme(targets=["Linear"], **{k: QuantizationArgs(**v) for k, v in PRESETS[preset].items()})
    apply_quantization_config(root, QuantizationConfig(config_groups={"group_0": scheme},
                                                       ignore=[r"re:.*router\.proj$"]))
    for mod in root.modules():
        if hasattr(mod, "quantization_scheme"):
            a, w = mod.quantization_scheme.weights, mod.weight.detach()
            g = w.unflatten(-1, (-1, a.group_size)) if a.strategy == "group" else w.unsqueeze(1)
            mod.weight_scale.data.copy_(calculate_qparams(g.amin(-1), g.amax(-1), a)[0].reshape(mod.weight_scale.shape))
            mod.quantization_status = QuantizationStatus.FROZEN
    comp = ModelCompressor.from_pretrained_model(root)
    comp.compress_model(root)
    out.mkdir()
    state = {}
    for key, t in root.state_dict().items():
        name = key[len("model.decoder."):]
        state[to_checkpoint(name) if name.endswith("encoder_layer_scalar") else key] = t.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((src / "config.json").read_text())
    comp.update_config(str(out))
    return out, root


@pytest.mark.parametrize("preset", list(PRESETS))
def test_packs_written_by_compressed_tensors_load_and_run(tmp_path, preset):
    src = create_random_model(tmp_path / "src", tiny_config(vocab_size=300), seed=5, dtype=torch.bfloat16)
    out, root = ct_pack(src, tmp_path / preset, preset)
    model = blockdiff.load_model(out, dtype="float32")
    tensors = tensors_of_file(out / "model.safetensors")
    group = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = group.config_groups["group_0"]
    for name in ("layers.0.self_attn.q_proj", "layers.3.mlp.down_proj", "self_conditioning.up_proj"):
        prefix = f"model.decoder.{name}."
        local = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        compressor = {"W4A16": PackedQuantizationCompressor}.get(preset, IntQuantizationCompressor)
        w = compressor.decompress(local, scheme)["weight"].float()
        x = torch.randn(6, w.shape[1])
        # activations 7-bit per token / bf16 around the int4 kernel / fp8 weights dequantized in fp32 here,
        # where compressed-tensors rounds the product to the bf16 of its scale
        tol = {"W8A8": 0.03, "W4A16": 0.01, "FP8_DYNAMIC": 0.005}[preset]
        assert ((model.get_submodule(name)(x) - F.linear(x, w)).norm() / F.linear(x, w).norm()) < tol, name
    assert type(model.layers[0].experts).__name__ == "Experts"          # fused experts stay dense in their packs
    assert torch.isfinite(model.block_logits(torch.randint(5, 200, (1, 8)), torch.randint(5, 200, (1, 16)))).all()


def tensors_of_file(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
