"""GhostRows's blocks (backends/torch/per_sample/rows.py) on hand-made factors and rows, in place
and in chunks.

The references are the blocks' materialised rows multiplied out densely in float64: the same
exact products of float32 (or float64) entries, summed in another order, so they agree to
float64 rounding of sums of |terms|: n_terms eps sum |a||b|, here below 1e-12 relative.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import backends.torch.per_sample.rows as ghost  # noqa: E402
from backends.torch.per_sample.rows import DenseBlock, FactorBlock, GhostRows  # noqa: E402


@pytest.mark.parametrize("embedding", [False, True])
def test_factor_rmatvec_writes_only_its_own_slice(embedding: bool) -> None:
    """G^T w of one block, written in place into a slice of a longer vector (GhostRows does):
    the slice holds the materialised rows' w^T G, the rest keeps its values, also when the
    slice held garbage (an embedding adds into zeros)."""
    gen = torch.Generator().manual_seed(3)
    n, t, d_out, d_in = 4, 3, 5, 6
    x = (torch.randint(0, 7, (n, t), generator=gen) if embedding
         else torch.randn(n, t, d_in, dtype=torch.float64, generator=gen))
    b = torch.randn(n, t, d_out, dtype=torch.float64, generator=gen)
    block = FactorBlock(2, (7, d_out) if embedding else (d_out, d_in), x, b)
    w = torch.randn(n, dtype=torch.float64, generator=gen)
    out = torch.full((block.size + 5,), 9.0, dtype=torch.float64)
    block.rmatvec(w, out[2:2 + block.size])
    expected = w @ block.materialise()
    assert torch.allclose(out[2:2 + block.size], expected, rtol=0, atol=1e-12)
    assert torch.equal(out[:2], torch.full((2,), 9.0, dtype=torch.float64))
    assert torch.equal(out[2 + block.size:], torch.full((3,), 9.0, dtype=torch.float64))
    assert torch.allclose(block.rmatvec(w), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [7, 2**18])
def test_dense_gram_in_column_chunks_equals_the_float64_product(
    dtype: torch.dtype, chunk: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gram() and cross_gram() of materialised blocks, their float32 columns converted in
    chunks (7 entries: 1 or 2 columns per chunk for N = 5 and 3, a ragged last chunk; 2**18:
    one chunk), equal G G^T and G H^T formed from the whole rows in float64."""
    monkeypatch.setattr(ghost, "_GRAM_CHUNK", chunk)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(5, 23, dtype=dtype, generator=gen)
    h = torch.randn(3, 23, dtype=dtype, generator=gen)

    def rows(r: torch.Tensor) -> GhostRows:
        blocks = [DenseBlock(0, r[:, :10]), DenseBlock(10, r[:, 10:])]
        return GhostRows(r.shape[0], 23, factors=[], dense=blocks, dtype=dtype,
                         device=r.device)

    g64, h64 = g.to(torch.float64), h.to(torch.float64)
    scale = float(g64.abs().max() * max(g64.abs().max(), h64.abs().max())) * 23
    assert float((rows(g).gram() - g64 @ g64.T).abs().max()) <= 1e-12 * scale
    assert float((rows(g).cross_gram(rows(h)) - g64 @ h64.T).abs().max()) <= 1e-12 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_dense_gram_from_half_the_products_is_symmetric_and_the_float64_product(
    dtype: torch.dtype, n: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gram() forms a_1 a_1^T and a_2 a^T of the rows split in half (N = 1: no top half;
    odd N: unequal halves) and mirrors the rest: exactly symmetric, and within float64
    rounding (23 terms: 23 eps |g|_max^2, bounded by 1e-12 of it) of G G^T formed whole."""
    monkeypatch.setattr(ghost, "_GRAM_CHUNK", 7 * n)  # 7 columns per chunk, a ragged last
    g = torch.randn(n, 23, dtype=dtype, generator=torch.Generator().manual_seed(n))
    gram = GhostRows(n, 23, factors=[], dense=[DenseBlock(0, g)], dtype=dtype,
                     device=g.device).gram()
    g64 = g.to(torch.float64)
    assert torch.equal(gram, gram.T)
    assert float((gram - g64 @ g64.T).abs().max()) <= 1e-12 * float(g64.abs().max()) ** 2 * 23
