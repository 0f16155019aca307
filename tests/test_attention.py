"""H-attention against its dense oracle, and the properties the definition promises."""

import subprocess
import sys

import pytest
import torch

from htcli.attention import dense_h_attention, h_attention, num_levels, pair_levels

CASES = [(1, 4), (5, 4), (100, 4), (100, 8), (100, 6), (1000, 16), (300, 128), (257, 128), (1000, 64)]


def _qkv(n, *, b=2, h=2, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, dtype=dtype) for _ in range(3)]


def _mask(b, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n, generator=gen) > 0.3
    mask[:, 0] = True
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n,block", CASES)
def test_equals_dense_oracle(n, block, causal, masked):
    """Fast path equals the dense oracle: 1e-10 in fp64, 1e-5 in fp32."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        q, k, v = _qkv(n, dtype=dtype)
        mask = _mask(2, n) if masked else None
        fast = h_attention(q, k, v, block_size=block, causal=causal, key_padding_mask=mask)
        dense = dense_h_attention(q, k, v, block_size=block, causal=causal, key_padding_mask=mask)
        assert fast.shape == q.shape
        assert (fast - dense).abs().max().item() < tol


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_equals_oracle(causal):
    """n = 3000 with block 32 crosses many levels and a ragged last block."""
    q, k, v = _qkv(3000, b=1, h=1, d=4)
    mask = _mask(1, 3000)
    fast = h_attention(q, k, v, block_size=32, causal=causal, key_padding_mask=mask)
    dense = dense_h_attention(q, k, v, block_size=32, causal=causal, key_padding_mask=mask)
    assert (fast - dense).abs().max().item() < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_equal_oracle(causal):
    """Gradients w.r.t. q, k, v match the oracle's in fp64."""
    q, k, v = (t.requires_grad_() for t in _qkv(300, d=4))
    mask = _mask(2, 300)
    grad_out = torch.randn(q.shape, dtype=q.dtype)
    grads = []
    for fn in (h_attention, dense_h_attention):
        out = fn(q, k, v, block_size=16, causal=causal, key_padding_mask=mask)
        grads.append(torch.autograd.grad(out, (q, k, v), grad_out))
    for fast, dense in zip(*grads):
        assert (fast - dense).abs().max().item() < 1e-10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,block", [(100, 4), (1000, 16), (257, 128)])
def test_level_decay_equals_oracle(n, block, causal):
    """With a level decay per head, outputs and gradients equal the oracle's (fp64), and the decay
    lowers each coarser level's scores by decay * level * ln 2: more weight stays near."""
    q, k, v = (t.requires_grad_() for t in _qkv(n, h=3, d=4))
    mask = _mask(2, n)
    decay = [4.0, 1.0, 0.25]
    grad_out = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (h_attention, dense_h_attention):
        out = fn(q, k, v, block_size=block, causal=causal, key_padding_mask=mask, level_decay=decay)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for fast, dense in zip(*results):
        assert (fast - dense).abs().max().item() < 1e-10
    plain = h_attention(q, k, v, block_size=block, causal=causal, key_padding_mask=mask)
    zero = h_attention(q, k, v, block_size=block, causal=causal, key_padding_mask=mask, level_decay=[0.0] * 3)
    assert torch.equal(plain, zero)
    if n > 2 * block:  # coarse levels exist: the decay changes the output
        assert (results[0][0] - plain).abs().max().item() > 1e-3


def test_level_decay_keeps_its_precision():
    """A decay given as Python floats is used at the inputs' precision: in float64, 0.7 as a list gives
    what 0.7 as a float64 tensor gives (it went through float32 first: 7e-9 off; review)."""
    q, k, v = _qkv(64, h=3, d=4)
    decay = [0.7, 1.3, 0.1]
    for fn in (h_attention, dense_h_attention):
        listed = fn(q, k, v, block_size=4, causal=True, level_decay=decay)
        exact = fn(q, k, v, block_size=4, causal=True, level_decay=torch.tensor(decay, dtype=torch.float64))
        assert (listed - exact).abs().max().item() < 1e-14


def test_level_decay_follows_rows_through_row_groups(monkeypatch):
    """The eager path works through rows a few at a time: each row keeps its own head's decay."""
    from htcli.attention import eager

    monkeypatch.setattr(eager, "ROW_GROUP_ELEMENTS", {"cpu": 1})  # one row at a time
    q, k, v = (t.requires_grad_() for t in _qkv(200, b=2, h=3, d=4))
    decay = [4.0, 1.0, 0.25]
    grad_out = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (h_attention, dense_h_attention):
        out = fn(q, k, v, block_size=8, causal=True, level_decay=decay)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for fast, dense in zip(*results):
        assert (fast - dense).abs().max().item() < 1e-10


def test_level_decay_weights_levels_as_defined():
    """One query, keys constant per level: with decay s the weight of level l's keys is 2**(-s l) per
    key relative to level 0's (so a value that is 1 on level l's keys reads their weight share)."""
    block, n = 4, 64
    q = torch.zeros(1, 1, n, 2, dtype=torch.float64)
    k = torch.zeros_like(q)  # every score 0: weights are the counts and the decay only
    levels = pair_levels(n, block, num_levels(n, block), causal=True)[n - 1]  # the last query's levels
    for decay in (0.0, 1.0, 2.5):
        for lv in range(1, num_levels(n, block)):
            v = torch.zeros_like(q)
            v[0, 0, levels == lv, 0] = 1.0
            out = h_attention(q, k, v, block_size=block, causal=True, level_decay=[decay])[0, 0, -1, 0]
            counts = {level: (levels == level).sum().item() for level in range(num_levels(n, block))}
            weights = {level: count * 2.0 ** (-decay * level) for level, count in counts.items()}
            assert abs(out.item() - weights[lv] / sum(weights.values())) < 1e-12


def test_level_decay_is_checked():
    """Per head, finite, >= 0; one number for all heads or a generator is refused in words (a TypeError)."""
    q, k, v = _qkv(10, h=2)
    for bad in ([1.0], [1.0, -1.0], [1.0, float("nan")], [1.0, float("inf")], 2.0, (x for x in (1.0, 2.0))):
        with pytest.raises(ValueError, match="level_decay"):
            h_attention(q, k, v, block_size=4, level_decay=bad)
        with pytest.raises(ValueError, match="level_decay"):
            dense_h_attention(q, k, v, block_size=4, level_decay=bad)


@pytest.mark.parametrize("causal", [False, True])
def test_every_pair_scored_once(causal):
    """Each pair (each j <= i when causal) has exactly one level; no future pair is scored."""
    block, levels = 4, 4
    length = block * 2**levels
    level = pair_levels(length, block, levels, causal)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = j <= i if causal else torch.ones(length, length, dtype=torch.bool)
    assert torch.equal(level >= 0, allowed)
    assert level.max().item() == levels - 1


def test_num_levels():
    """M = max(1, ceil(log2(ceil(n / Nr))))."""
    assert [num_levels(n, 4) for n in (1, 4, 8, 9, 16, 17, 33)] == [1, 1, 1, 2, 2, 3, 4]


@pytest.mark.parametrize("causal", [False, True])
def test_constant_values(causal):
    """Softmax weights sum to one: constant v comes back unchanged."""
    q, k, _ = _qkv(777, dtype=torch.float32)
    v = torch.full_like(q, 3.25)
    out = h_attention(q, k, v, block_size=8, causal=causal, key_padding_mask=_mask(2, 777))
    assert torch.allclose(out, v, atol=1e-5)


def test_short_sequence_is_exact_attention():
    """With n <= 2 * block_size nothing is coarsened: full softmax attention (non-causal)."""
    for n in (7, 32, 64):
        q, k, v = _qkv(n)
        out = h_attention(q, k, v, block_size=32, causal=False)
        exact = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
        assert (out - exact).abs().max().item() < 1e-12


def test_causal_gradients():
    """out[i] has zero gradient from every input after i, non-zero from every input up to i."""
    n = 150
    q, k, v = (t.requires_grad_() for t in _qkv(n, b=1, h=1, d=4))
    out = h_attention(q, k, v, block_size=4, causal=True)
    for i in (0, 3, 4, 37, 64, 100, 149):
        gq, gk, gv = torch.autograd.grad(out[0, 0, i].sum(), (q, k, v), retain_graph=True)
        for g in (gq, gk, gv):
            per_position = g[0, 0].abs().sum(-1)
            assert (per_position[i + 1 :] == 0).all(), f"position {i} sees the future"
        seen = (gk[0, 0].abs().sum(-1) + gv[0, 0].abs().sum(-1))[: i + 1]
        assert (seen > 0).all(), f"position {i} misses earlier tokens"


def test_non_causal_full_receptive_field():
    """Every output depends on every real input, and on no padded one."""
    n = 200
    q, k, v = (t.requires_grad_() for t in _qkv(n, b=1, h=1, d=4))
    mask = _mask(1, n)
    out = h_attention(q, k, v, block_size=8, causal=False, key_padding_mask=mask)
    for i in (0, 50, 199):
        _, gk, gv = torch.autograd.grad(out[0, 0, i].sum(), (q, k, v), retain_graph=True)
        seen = (gk[0, 0].abs().sum(-1) + gv[0, 0].abs().sum(-1)) > 0
        assert torch.equal(seen, mask[0])


@pytest.mark.parametrize("causal", [False, True])
def test_large_scores_stay_finite(causal):
    """Scores of magnitude 1e4 in fp32 give finite results that match the fp64 oracle."""
    q, k, v = _qkv(300, d=4, dtype=torch.float32)
    q = q * 100
    k = k * 100  # q.k / sqrt(d) ~ 1e4
    out = h_attention(q, k, v, block_size=16, causal=causal)
    assert torch.isfinite(out).all()
    dense = dense_h_attention(q.double(), k.double(), v.double(), block_size=16, causal=causal)
    assert (out.double() - dense).abs().max().item() < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_autocast(causal):
    """Under bf16 autocast the result stays within bf16 tolerance of fp32."""
    q, k, v = _qkv(500, d=16, dtype=torch.float32)
    reference = h_attention(q, k, v, block_size=16, causal=causal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = h_attention(q, k, v, block_size=16, causal=causal)
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max().item() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_score_in_fp32(dtype):
    """The eager path's q.k product in half precision rounded every score to 8 bits (bf16: 13x SDPA's error
    at unit-scale inputs times 3) and, in fp16, overflowed past 65504 before the scale (NaN at a score of
    9000); it is taken in fp32, as flash attention keeps its scores: as accurate as SDPA in that precision
    (16 positions, block 8: every key in reach), gradients too (dP - delta cancels)."""
    torch.manual_seed(0)
    q, k = (torch.randn(1, 2, 16, 64, dtype=torch.float64).mul(3).requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, 16, 64, dtype=torch.float64, requires_grad=True)
    dense = dense_h_attention(q, k, v, block_size=8, causal=False)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.detach().to(dtype) for t in (q, k, v)))
    half = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = h_attention(*half, block_size=8, causal=False)
    assert (out.double() - dense).abs().max() <= 1.5 * (sdpa.double() - dense).abs().max() + 1e-3
    exact = torch.autograd.grad(dense.square().sum(), (q, k, v))
    ours = torch.autograd.grad(out.float().square().sum(), half)
    for mine, reference in zip(ours, exact, strict=True):
        assert (mine.double() - reference).abs().max() < 0.03 * reference.abs().max()
    big = torch.full((1, 1, 8, 64), 12.0, dtype=dtype)  # (q.k = 9216 * 8 = 73,728 before the scale)
    assert torch.isfinite(h_attention(big, big, big, block_size=4, causal=True)).all()


def test_fp64_stays_fp64_under_autocast():
    """Autocast lowers fp32 products only, as torch's own matmul and SDPA do: fp64 inputs came back bf16."""
    q, k, v = _qkv(50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = h_attention(q, k, v, block_size=4, causal=True)
    assert out.dtype == torch.float64
    assert torch.allclose(out, dense_h_attention(q, k, v, block_size=4, causal=True), atol=1e-9)


def test_bad_inputs():
    """Mismatched shapes, odd block size and wrong masks give clear errors."""
    q, k, v = _qkv(10)
    with pytest.raises(ValueError, match="same shape"):
        h_attention(q, k[:, :, :5], v, block_size=4)
    with pytest.raises(ValueError, match="even"):
        h_attention(q, k, v, block_size=5)
    with pytest.raises(ValueError, match="key_padding_mask"):
        h_attention(q, k, v, block_size=4, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="dim_head must be at least 1"):  # (a ZeroDivisionError)
        h_attention(q[..., :0], k[..., :0], v[..., :0], block_size=4)
    with pytest.raises(ValueError, match="floating-point tensors of one dtype, got torch.int64"):
        h_attention(q.long(), k.long(), v.long(), block_size=4)  # (returned integers)
    with pytest.raises(ValueError, match="floating-point tensors of one dtype"):
        h_attention(q, k, v.float(), block_size=4)
    # (three of one shape of 3 dimensions were said to differ in shape)
    with pytest.raises(ValueError, match=r"tensors of 4 dimensions .*got \(2, 10, 8\), \(2, 10, 8\)"):
        h_attention(q[0], k[0], v[0], block_size=4)
    with pytest.raises(ValueError, match="causal must be True or False, got 'no'"):  # (the op's schema dump)
        h_attention(q, k, v, block_size=4, causal="no")


def test_length_just_above_power_of_two_costs_no_double():
    """Blocks of padding are not computed: n = 2^k + 1 block costs about as much as n = 2^k."""
    from torch.profiler import ProfilerActivity, profile

    def flops(n):
        q, k, v = _qkv(n, b=1, h=1, d=16, dtype=torch.float32)
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            h_attention(q, k, v, block_size=32, causal=False)
        return sum(e.flops for e in prof.key_averages())

    assert flops(4096 + 32) < 1.2 * flops(4096)


def test_long_sequence_memory():
    """n = 65536 (fp32, one head, d 64) runs forward and backward within a few GB (own process)."""
    script = (
        "import resource, torch\n"
        "from htcli.attention import h_attention\n"
        "q, k, v = (torch.randn(1, 1, 65536, 64, requires_grad=True) for _ in range(3))\n"
        "h_attention(q, k, v, block_size=128, causal=True).sum().backward()\n"
        "assert torch.isfinite(q.grad).all()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak_gb = int(result.stdout.split()[-1]) / 2**20
    assert peak_gb < 3, f"peak RSS {peak_gb:.2f} GB"


@pytest.mark.parametrize("decay", [None, torch.tensor([2.0, 1.0, 3.0, 0.5])])
@pytest.mark.parametrize("causal", [False, True])
def test_custom_op_registration(causal, decay):
    """The forward op's fake (shape-only) version, autograd and schema agree with the real one."""
    from htcli.attention.ops import _forward_op

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 100, 16, generator=gen, requires_grad=True) for _ in range(3))
    torch.library.opcheck(_forward_op, (q, k, v, torch.ones(4, 100), decay, 16, causal, "eager"))


def test_graphed_passes_capture_at_the_second_sight_and_fall_back(monkeypatch):
    """attention.graphed's bookkeeping (its CUDA graphs themselves are tested in test_cuda.py, against
    launched passes): a key's first call launches, its second captures and replays, later ones replay;
    a capture that fails leaves its key launching; at most MAX_GRAPHS kept, the least recently used
    dropped first. Here a stand-in records what would be captured (no CUDA on this machine)."""
    from htcli.attention import graphed

    captured = []

    class StandIn:
        def __init__(self, fn, tensors):
            if tensors[0].numel() == 99:
                raise RuntimeError("CUDA out of memory (test)")
            captured.append(tensors[0].numel())
            self.fn = fn

        def __call__(self, tensors):
            return ("replayed", *self.fn(*tensors))

    for name, value in (("_Captured", StandIn), ("_graphs", type(graphed._graphs)()), ("_seen", set()),
                        ("_failed", {})):  # fmt: skip
        monkeypatch.setattr(graphed, name, value)

    def call(size: int):
        return graphed.replay("pass", lambda x: (x * 2,), [torch.ones(size)], (64, True))

    assert call(3)[0].tolist() == [2.0] * 3 and not captured
    assert call(3)[0] == "replayed" and call(3)[0] == "replayed" and captured == [3]
    assert len(call(99)) == 1 and len(call(99)) == 1 and len(call(99)) == 1 and 99 not in captured
    assert list(graphed._failed.values()) == ["RuntimeError: CUDA out of memory (test)"]
    for size in range(4, 4 + graphed.MAX_GRAPHS):
        call(size), call(size)
    assert len(graphed._graphs) == graphed.MAX_GRAPHS and captured[0] == 3
    assert call(3)[0] == "replayed" and captured[-1] == 3  # (dropped first: captured again)
