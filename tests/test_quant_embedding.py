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
    """Embedding lookup, soft embedding and the tokens of the vocabulary-streamed sampler (which reads
    dequantized tiles) equal those of the model holding `q * scale` as its embedding matrix; the LM
    head, int8 x int8 with activations per token, is within those activations' rounding of it."""
    quant = blockdiff.load_model(packs["int8"], dtype=dtype)
    ref = blockdiff.load_model(packs["bf16"], dtype=dtype)
    w = ref.embed_tokens.weight.detach()
    q, scale = quantize_weight(w.to(torch.bfloat16), WeightArgs(8))       # what quantize stored (from bf16)
    ref.embed_tokens.weight.data = dequantize_weight(q, scale.to(dtype))
    assert torch.equal(quant.embed_tokens.weight[:], ref.embed_tokens.weight)
    ids = torch.randint(0, quant.config.vocab_size, (2, 24))
    assert torch.equal(quant.embed(ids), ref.embed(ids))
    sc = torch.randn(2, 24, quant.config.vocab_size)
    assert torch.equal(quant.soft_embedding(sc), ref.soft_embedding(sc))
    h = torch.randn(2, 24, quant.config.hidden_size).to(dtype)
    head, exact = quant.lm_head(h), torch.nn.functional.linear(h.float(), ref.embed_tokens.weight.float())
    assert head.shape == exact.shape and head.dtype == dtype
    assert (head.float() - exact).norm() / exact.norm() < 0.04       # 7-bit activations without VNNI: ~1.5%
    assert (head.float().argmax(-1) == exact.argmax(-1)).float().mean() > 0.8
    sp = blockdiff.SamplingParams(max_tokens=48, seed=3, max_denoising_steps=6, ignore_eos=True)
    outs = [blockdiff.LLM(m, tokenizer=None, sampler_memory_mb=0.05).generate([[5, 9, 11]] * 2, sp)
            for m in (quant, ref)]                                      # streamed tiles
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


def test_int8_embedding_serves_structured_output(packs):
    """Grammar repair reads LM-head logits through the model's head: int8 rows have no matrix to multiply."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    sp = blockdiff.SamplingParams(max_tokens=24, seed=0, json_schema=schema, max_denoising_steps=4)
    out = blockdiff.LLM(packs["int8"]).generate(["{"], sp)[0]
    assert out.finish_reason in ("stop", "length")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text)["a"], int)
