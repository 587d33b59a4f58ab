"""The vocabulary side of a denoising step, streamed: tiles of the embedding matrix, never positions x vocab.

For P positions with final hidden states h (P, H) and the tied embedding E (V, H), one pass over
vocabulary tiles E[lo:lo+T] computes each tile's processed logits y = softcap(h @ E_t^T) / temp
(P, T) with the materialised step's ops in its order, and folds them into running statistics, the
online softmax of flash attention applied to the vocabulary (as in cut cross-entropy):
  m      running max of y                                   (P,)
  z      sum exp(y - m)            -> max probability 1 / z (P,)
  s      sum exp(y - m) (y - m)    -> entropy log z - s / z (P,)
  argmax first index of the max                             (P,)
  soft   sum exp(y - m) E_v        -> self-conditioning input soft / z (P, H)
  blocks sums of exp(y - m) over blocks of BLOCK tokens     (P, V / BLOCK)
Each tile's matrix is read once for all positions. Sampling is the materialised step's two-level
inverse CDF: the block from the block sums, then the token inside it from that block's logits,
recomputed from a gather of BLOCK embedding rows per position (`sample_from_blocks`).

The same math as the materialised step, rounded differently in three places: z, s and the block
sums add in another order (tile by tile, rescaled by exp(m_old - m_new)); the soft embedding
divides by z after the matmul instead of before; and the recomputed block's logits come from a
batched matmul, which equals the tile's row for row where the BLAS rounds a row the same at every
row count >= 4 (MKL on AVX2: bit-equal). Logits, softcap, temperature and argmax are bit-equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise import locate_block, locate_in_block

BLOCK = 64                  # tokens per block sum: the sampler recomputes one block per position
TILE_BYTES = 8 << 20        # a tile's two fp32 (P, T) buffers: L2/L3-resident on CPU


def block_bits(device) -> torch.Tensor:
    """(BLOCK,) int64 powers of two: a block's kept tokens as the bits of one int64."""
    return torch.ones(BLOCK, dtype=torch.int64, device=device) << torch.arange(BLOCK, device=device)


def tile_width(positions: int, vocab: int, tile_bytes: int = TILE_BYTES) -> int:
    """Vocabulary tile T: a multiple of BLOCK with two fp32 (P, T) buffers in `tile_bytes`."""
    t = tile_bytes // (8 * positions) // BLOCK * BLOCK
    return min(max(t, BLOCK), -(-vocab // BLOCK) * BLOCK)


@dataclass
class Bar:
    """Tokens barred at some positions (a request's min_tokens): the end-of-sequence `ids` get raw
    logit -inf where `mask` (the logits' leading shape: (R, C) materialised, (P,) streamed) is set."""
    ids: tuple[int, ...]
    mask: torch.Tensor

    def apply(self, x: torch.Tensor, lo: int) -> torch.Tensor:
        """Raw logits x (..., T) of tokens [lo, lo + T), in place: only the columns of `ids` inside the
        slice are touched. After the softcap a barred id has the lowest logit it allows (-cap), so it
        is never the argmax."""
        for i in self.ids:
            if lo <= i < lo + x.shape[-1]:
                x[..., i - lo].masked_fill_(self.mask, float("-inf"))
        return x


@dataclass
class Head:
    """What the vocabulary side needs of the model: the tied embedding (V, H), the softcap, and the
    fp32 softcap table of 16-bit logits (None for fp32; see `sampler.softcap_table`)."""
    weight: torch.Tensor
    cap: float
    table: torch.Tensor | None
    # 16-bit weights on a CPU without native bf16/fp16 matmuls: multiply each tile in fp32 and round
    # the products to the weight dtype, as the 16-bit kernel does (that kernel is a slow fallback
    # there: 20-30x slower for the soft embedding's (P, T) x (T, H) product)
    upcast: bool = False
    bar: Bar | None = None       # barred tokens, mask (P,), as in the materialised step

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b in the weight dtype (a, b in that dtype)."""
        if self.upcast:
            return torch.mm(a.float(), b.float()).to(a.dtype)
        return torch.mm(a, b)

    def process(self, x: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
        """Raw logits (P, T) in the weight dtype -> fp32 softcap(x) / temp (P,), the materialised
        step's ops in its order (in place for fp32)."""
        if self.table is not None:
            y = torch.take(self.table, x.view(torch.int16).to(torch.int64) + 32768)
        elif x.dtype == torch.float32:
            y = x.div_(self.cap).tanh_().mul_(self.cap) if self.cap else x
        else:
            y = torch.tanh(x.float() / self.cap) * self.cap if self.cap else x.float()
        return y.div_(temp[:, None])

    def logits_into(self, out: torch.Tensor, h: torch.Tensor, lo: int, temp: torch.Tensor) -> None:
        """Processed logits of tokens [lo, lo + T) into out (P, T) fp32."""
        w = self.weight[lo:lo + out.shape[1]]
        if w.dtype == torch.float32:
            self.process(self.barred(torch.mm(h, w.t(), out=out), lo), temp)
        else:
            out.copy_(self.process(self.barred(self.mm(h, w.t()), lo), temp))

    def barred(self, x: torch.Tensor, lo: int) -> torch.Tensor:
        return x if self.bar is None else self.bar.apply(x, lo)


@dataclass
class VocabStats:
    m: torch.Tensor          # (P,) max processed logit
    z: torch.Tensor          # (P,) sum exp(y - m)
    s: torch.Tensor          # (P,) sum exp(y - m) * (y - m)
    argmax: torch.Tensor     # (P,) int64
    soft: torch.Tensor       # (P, H) fp32 sum exp(y - m) * E_v, not yet divided by z
    blocks: torch.Tensor     # (P, nb) fp32 block sums of exp(y - m)

    @property
    def entropy(self) -> torch.Tensor:
        return self.z.log() - self.s / self.z


def stream_vocab(head: Head, h: torch.Tensor, temp: torch.Tensor, tile: int) -> VocabStats:
    """The one pass over the vocabulary: h (P, H), temp (P,), tiles of `tile` tokens (a multiple of BLOCK)."""
    w, dev = head.weight, h.device
    (p, hidden), v = h.shape, w.shape[0]
    m = torch.full((p,), torch.finfo(torch.float32).min, device=dev)       # finite: exp(m - m_new) = 0
    z, s = torch.zeros(p, device=dev), torch.zeros(p, device=dev)
    argmax = torch.zeros(p, dtype=torch.int64, device=dev)
    soft = torch.zeros(p, hidden, device=dev)
    n_tiles, per_tile = -(-v // tile), tile // BLOCK
    blocks, tile_m = torch.empty(p, n_tiles * per_tile, device=dev), torch.empty(p, n_tiles, device=dev)
    y_buf, e_buf = torch.empty(p, tile, device=dev), torch.empty(p, tile, device=dev)
    for t, lo in enumerate(range(0, v, tile)):
        n = min(tile, v - lo)
        nbt = -(-n // BLOCK)
        y, e = y_buf[:, :nbt * BLOCK], e_buf[:, :nbt * BLOCK]
        head.logits_into(y[:, :n], h, lo, temp)
        y[:, n:] = float("-inf")                        # a partial last block: no mass, never the max
        by_block = y.view(p, nbt, BLOCK)
        tmax, b = by_block.amax(-1).max(-1)                                   # tile max, its first block
        inner = by_block.gather(1, b[:, None, None].expand(p, 1, BLOCK)).squeeze(1)
        argmax = torch.where(tmax > m, lo + b * BLOCK + inner.argmax(-1), argmax)   # first index of the max
        m_new = torch.maximum(m, tmax)
        alpha = torch.exp(m - m_new)
        torch.exp(y.sub_(m_new[:, None]), out=e)                              # y <- y - m_new, e = exp(y)
        s = alpha * (s + (m - m_new) * z) + torch.linalg.vecdot(e[:, :n], y[:, :n])
        sums = blocks[:, t * per_tile:t * per_tile + nbt]
        torch.sum(e.view(p, nbt, BLOCK), -1, out=sums)
        z = alpha * z + sums.sum(-1)
        tile_m[:, t] = m_new
        w_t = w[lo:lo + n]
        if w.dtype == torch.float32:
            soft.mul_(alpha[:, None]).addmm_(e[:, :n], w_t)
        else:
            soft.mul_(alpha[:, None]).add_(head.mm(e[:, :n].to(w.dtype), w_t))
        m = m_new
    blocks.view(p, n_tiles, per_tile).mul_(torch.exp(tile_m - m[:, None])[:, :, None])   # every tile's to the final max
    return VocabStats(m, z, s, argmax, soft, blocks[:, :-(-v // BLOCK)])


def block_masses(head: Head, h: torch.Tensor, temp: torch.Tensor, b: torch.Tensor, m: torch.Tensor, chunk: int):
    """Block b (P,) of every position, recomputed: its masses exp(y - m) (P, BLOCK), 0 past the
    vocabulary. Positions go `chunk` at a time (gathered rows: chunk x BLOCK x H); each row is
    multiplied as 4 equal rows, because BLAS kernels round a lone row their own way and the tile's
    rows came from a many-row product."""
    w, v, (p, hidden) = head.weight, head.weight.shape[0], h.shape
    ids = b[:, None] * BLOCK + torch.arange(BLOCK, device=h.device)                # (P, BLOCK)
    y = torch.empty(p, BLOCK, device=h.device)
    barred = None if head.bar is None else \
        head.bar.mask[:, None] & torch.isin(ids, torch.tensor(head.bar.ids, device=h.device))   # (P, BLOCK)
    for lo in range(0, p, chunk):
        hi = min(lo + chunk, p)
        rows = w[ids[lo:hi].clamp(max=v - 1)]                                        # (q, BLOCK, H)
        x = torch.bmm(h[lo:hi, None, :].expand(hi - lo, 4, hidden).contiguous(), rows.transpose(1, 2))[:, 0]
        if barred is not None:
            x.masked_fill_(barred[lo:hi], float("-inf"))
        y[lo:hi] = head.process(x, temp[lo:hi])
    return torch.exp(y - m[:, None]).masked_fill_(ids >= v, 0.0)


def sample_from_blocks(head: Head, h, temp, blocks, m, u, chunk: int, kept_bits=None) -> torch.Tensor:
    """Inverse CDF at u (P,): the block by the block sums (P, nb), then the token inside it.
    `kept_bits` (P, nb) int64: which tokens of each block a top-k / top-p set keeps."""
    b, target, before = locate_block(blocks, u)
    e = block_masses(head, h, temp, b.squeeze(-1), m, chunk)
    if kept_bits is not None:
        e = e * ((kept_bits.gather(1, b) & block_bits(e.device)) != 0)
    return (b * BLOCK + locate_in_block(e, target, before)).squeeze(-1)
