"""Evaluation: every byte scored once, equal to a direct byte-by-byte computation."""

import math

import pytest
import torch
from conftest import make_text

from htcli import evaluate as evaluate_module
from htcli.corpus import ByteCorpus
from htcli.errors import HtcliError
from htcli.evaluate import evaluate, plan_windows, position_buckets
from htcli.model import HTransformer1D, HTransformerConfig
from htcli.train_step import validation_bpb


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = HTransformerConfig(dim=32, depth=2, heads=2, dim_head=16, block_size=4, max_seq_len=16)
    return HTransformer1D(config).double().eval()


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(make_text(61, seed=3))
    with ByteCorpus([path]) as opened:
        yield opened


@pytest.mark.parametrize(
    "n,context,stride", [(61, 16, 1), (61, 16, 5), (61, 16, 16), (10, 16, 4), (2, 16, 8)]
)
def test_windows_score_every_byte_once(n, context, stride):
    """The windows' scored bytes are exactly 1 .. n-1, each once."""
    scored = []
    for end, count in plan_windows(n, context, stride):
        assert count <= min(context, n - 1)
        scored += range(end - count + 1, end + 1)
    assert scored == list(range(1, n))


def direct_bits(model, data: bytes, context_start) -> float:
    """Bits per byte computed byte by byte: byte t predicted from data[context_start(t):t] alone."""
    nats = 0.0
    with torch.no_grad():
        for t in range(1, len(data)):
            context = torch.tensor([list(data[context_start(t) : t])])
            nats -= torch.log_softmax(model(context)[0, -1], -1)[data[t]].item()
    return nats / (len(data) - 1) / math.log(2)


def test_stride_one_equals_direct_computation(model, corpus):
    """With stride 1, byte t is predicted from the (up to) 16 bytes before it: same bits per byte."""
    data = corpus.read(0, len(corpus))
    expected = direct_bits(model, data, lambda t: max(0, t - 16))
    result = evaluate(model, corpus.span(), stride=1, batch_size=7, dtype=torch.float64)
    assert result.bytes_scored == 60
    assert result.bits_per_byte == pytest.approx(expected, rel=1e-6)
    assert result.nats_per_byte == pytest.approx(expected * math.log(2), rel=1e-6)


@pytest.mark.parametrize("positions", [4096, 3])
def test_any_stride_equals_direct_computation(model, corpus, monkeypatch, positions):
    """With stride 5, each byte's context starts where the documented window that scores it starts; the
    same where a window's log-likelihoods are computed a few positions at a time (as long contexts are)."""
    monkeypatch.setattr(evaluate_module, "NLL_POSITIONS", positions)
    data = corpus.read(0, len(corpus))

    def window_start(t: int) -> int:
        if t <= 16:
            return 0  # the first window scores bytes 1..16
        end = min(16 + 5 * math.ceil((t - 16) / 5), len(data) - 1)
        return end - 16

    expected = direct_bits(model, data, window_start)
    result = evaluate(model, corpus.span(), stride=5, batch_size=3, dtype=torch.float64)
    assert result.bits_per_byte == pytest.approx(expected, rel=1e-6)


def test_a_corpus_shorter_than_the_context_reports_what_was_used(model, corpus):
    """11 bytes under a 16-byte context: one window of 10 inputs, reported as context 10 and stride 10,
    whatever stride was asked (a stride of 16 was shown as "context / stride 10 / 16", the default as 8)."""
    result = evaluate(model, corpus.span(0, 11), stride=16, dtype=torch.float64)
    assert (result.context, result.stride, result.bytes_scored) == (10, 10, 10)
    assert evaluate(model, corpus.span(0, 11), dtype=torch.float64).stride == 10
    # a corpus of exactly one window (context + 1 bytes): one window, its 16 bytes (it said stride 8)
    result = evaluate(model, corpus.span(0, 17), dtype=torch.float64)
    assert (result.context, result.stride, result.bytes_scored) == (16, 16, 16)


def test_validation_bpb_is_the_mean_over_full_windows(model, corpus):
    """The training-time estimate over one window equals evaluate() on that window's bytes."""
    span = corpus.span(0, 17)
    _, bits = validation_bpb(model, span, windows=1, batch_size=1, dtype=torch.float64)
    assert bits == pytest.approx(
        evaluate(model, span, stride=16, dtype=torch.float64).bits_per_byte, rel=1e-12
    )


def test_bad_stride_and_tiny_corpus(model, corpus):
    """A stride outside 1..context and a corpus under 2 bytes are refused."""
    with pytest.raises(HtcliError, match=r"stride must be between 1 and the context \(\d+\)"):
        evaluate(model, corpus.span(), stride=17)
    with pytest.raises(HtcliError, match="the corpus is 1 byte long: it must be at least 2 bytes"):
        evaluate(model, corpus.span(0, 1))
    with pytest.raises(HtcliError, match="batch_size must be a positive integer"):  # (islice's ValueError)
        evaluate(model, corpus.span(), batch_size=1.5)
    for stride in (1.5, True):  # (a TypeError of range(); True was taken as 1; review)
        with pytest.raises(HtcliError, match=f"stride must be an integer number of bytes, got {stride}"):
            evaluate(model, corpus.span(), stride=stride)
    import numpy

    assert evaluate(model, corpus.span(), stride=numpy.int64(8)).stride == 8  # (numpy's integers taken)


def test_a_corpus_that_is_no_span_is_refused(model, corpus):
    """evaluate(model, some bytes) and a span past the corpus's end said what Python or torch said."""
    with pytest.raises(HtcliError, match=r"the corpus must be a ByteSpan \(htcli.corpus.ByteCorpus.open"):
        evaluate(model, b"some bytes to score")
    for start, stop in ((10, 5), (0, len(corpus.span()) + 1), (-1, 5)):
        with pytest.raises(HtcliError, match=r"a span must have 0 <= start <= stop <= the corpus's"):
            corpus.span(start, stop)


def test_position_buckets_double():
    """Buckets 0-63, 64-127, 128-255, ... end at the context."""
    assert position_buckets(16) == [(0, 15)]
    assert position_buckets(300) == [(0, 63), (64, 127), (128, 255), (256, 299)]


def test_by_position_equals_direct_computation(model, corpus):
    """By position (stride = context): each bucket's bits per byte is the mean over the windows' predictions
    at those positions, computed byte by byte; the buckets' bytes add up to every byte scored."""
    data = corpus.read(0, len(corpus))
    result = evaluate(model, corpus.span(), by_position=True, batch_size=3, dtype=torch.float64)
    assert result.stride == 16
    ends = [end for end, _ in plan_windows(len(data), 16, 16)]
    expected = []
    with torch.no_grad():
        for end in ends:
            start = end - 16
            window = torch.tensor([list(data[start : end + 1])])
            nll = -torch.log_softmax(model(window[:, :-1]), -1)[0].gather(1, window[0, 1:, None])[:, 0]
            scored = end - (ends[ends.index(end) - 1] if ends.index(end) else 0)
            expected += [(p, nll[p].item()) for p in range(16 - scored, 16)]
    (bucket,) = result.by_position
    assert bucket["bytes"] == len(expected) == result.bytes_scored
    assert bucket["bits_per_byte"] == pytest.approx(sum(n for _, n in expected) / len(expected) / math.log(2))
    assert bucket["bits_per_byte"] == pytest.approx(result.bits_per_byte)
    # a stride below the context leaves the first positions to the first window alone: refused
    assert evaluate(model, corpus.span(), by_position=True, stride=16, dtype=torch.float64).stride == 16
    with pytest.raises(
        HtcliError, match=r"and stride 10 scores only a window's last 10 \(the first 6 positions in"
    ):
        evaluate(model, corpus.span(), by_position=True, stride=10)
