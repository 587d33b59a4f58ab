"""The int8 embedding (tied LM head): packing, the checkpoint it writes, and a quantized model equal
to the same model holding the dequantized embedding as an ordinary bf16/fp32 matrix."""
import json

import pytest
import torch

import blockdiff
from blockdiff.cli.common import DEFAULT_MODEL
from blockdiff.quant.convert import quantize
from blockdiff.quant.embedding import QuantEmbedding
from blockdiff.quant.scheme import WeightArgs, dequantize_weight, pack_int8, quantize_weight, unpack_int8


def test_int8_packing_matches_the_compressed_tensors_layout():
    q = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    assert pack_int8(q).tolist() == [[0xff807f00 - 2**32]]               # q + 128, low byte first
    q = torch.randint(-128, 128, (3, 10), dtype=torch.int8)              # K not a multiple of 4: padded
    assert pack_int8(q).shape == (3, 3) and torch.equal(unpack_int8(pack_int8(q), 10), q)


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    return {e: quantize(DEFAULT_MODEL, root / e, "w8a8", progress=False, embedding=e) for e in ("bf16", "int8")}


def test_int8_embedding_checkpoint(packs):
    qc = json.loads((packs["int8"] / "config.json").read_text())["quantization_config"]
    groups = [g for g in qc["config_groups"].values() if any("embed_tokens" in t for t in g["targets"])]
    assert len(groups) == 1 and groups[0]["format"] == "pack-quantized" and groups[0]["input_activations"] is None
    assert groups[0]["weights"]["num_bits"] == 8 and groups[0]["weights"]["strategy"] == "channel"
    size = {e: sum(f.stat().st_size for f in p.glob("*.safetensors")) for e, p in packs.items()}
    model = blockdiff.load_model(packs["int8"])
    v, h = model.config.vocab_size, model.config.hidden_size
    assert size["bf16"] - size["int8"] == pytest.approx(v * h - v * 2, rel=0.01)   # bf16 -> int8 + a scale per row
    assert isinstance(model.embed_tokens, QuantEmbedding) and model.embed_tokens.q.dtype == torch.int8


def test_int8_embedding_equals_its_dequantized_reference(packs, dtype=torch.bfloat16):
    """Embedding lookup, LM head, soft embedding and generated tokens (dense and vocabulary-streamed
    sampler) equal those of the model holding `q * scale` as its embedding matrix."""
    quant = blockdiff.load_model(packs["int8"], dtype=dtype)
    ref = blockdiff.load_model(packs["bf16"], dtype=dtype)
    w = ref.embed_tokens.weight.detach()
    q, scale = quantize_weight(w.to(torch.bfloat16), WeightArgs(8))       # what quantize stored (from bf16)
    ref.embed_tokens.weight.data = dequantize_weight(q, scale.to(dtype))
    assert torch.equal(quant.embed_tokens.weight[:], ref.embed_tokens.weight)
    ids = torch.randint(0, quant.config.vocab_size, (2, 24))
    ctx = torch.randint(0, quant.config.vocab_size, (2, 40))
    assert torch.equal(quant.embed(ids), ref.embed(ids))
    assert torch.equal(quant.block_logits(ctx, ids), ref.block_logits(ctx, ids))
    sp = blockdiff.SamplingParams(max_tokens=48, seed=3, max_denoising_steps=6, ignore_eos=True)
    for budget in (256, 0.05):                                          # dense step, then streamed tiles
        outs = [blockdiff.LLM(m, tokenizer=None, sampler_memory_mb=budget).generate([[5, 9, 11]] * 2, sp)
                for m in (quant, ref)]
        assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]
