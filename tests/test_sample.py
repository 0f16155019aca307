"""Sampling: probability shaping, determinism, the recompute path, UTF-8 streaming."""

import math

import pytest
import torch
from conftest import TINY_MODEL

from htcli.errors import HtcliError
from htcli.model import HTransformer1D, HTransformerConfig
from htcli.sample import (
    Decoder,
    SamplingConfig,
    TokenSampler,
    Utf8Stream,
    generate,
    generate_batch,
    inverse_cdf,
    logits_to_probs,
)


def tiny_model(seed: int = 0) -> HTransformer1D:
    torch.manual_seed(seed)
    return HTransformer1D(HTransformerConfig(**TINY_MODEL)).eval()


def test_top_k_and_top_p_cut_the_tail():
    """top-k keeps the k most likely; top-p keeps the fewest most likely covering p."""
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    assert (logits_to_probs(logits, top_k=2) > 0).tolist() == [True, True, False, False]
    assert (logits_to_probs(logits, top_p=0.7) > 0).tolist() == [True, True, False, False]
    assert (logits_to_probs(logits, top_p=0.75) > 0).tolist() == [True, True, False, False]
    assert (logits_to_probs(logits, top_p=0.76) > 0).tolist() == [True, True, True, False]
    assert torch.allclose(logits_to_probs(logits), torch.tensor([0.5, 0.25, 0.15, 0.1]))
    # a top_p below fp32's smallest number (0 there) still keeps the most likely
    assert (logits_to_probs(logits, top_p=1e-46) > 0).tolist() == [True, False, False, False]


def test_top_k_keeps_k_bytes_with_ties_and_a_tiny_temperature_sharpens():
    """Bytes tied with the k-th were all kept (more than k drawn from: ties are common in bf16 logits); a
    temperature below 1e-5 was taken as 1e-5, so that it did not make near-ties one byte."""
    assert int((logits_to_probs(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), top_k=1) > 0).sum()) == 1
    assert int((logits_to_probs(torch.tensor([[2.0, 1.0, 1.0, 1.0]]), top_k=2) > 0).sum()) == 2
    sharp = logits_to_probs(torch.tensor([[1.0, 1.00001, 0.0]]), temperature=1e-9)
    assert sharp.tolist() == [[0.0, 1.0, 0.0]]
    for tiny in (1e-40, 1e-50, 5e-324):  # (below fp32's smallest: 0 / 0 was NaN, and token 256 drawn; review)
        assert (
            logits_to_probs(torch.tensor([[1.0, 1.00001, 0.0]]), temperature=tiny).tolist() == sharp.tolist()
        )
        sampler = TokenSampler([SamplingConfig(temperature=tiny, top_p=0.5, seed=0)])
        assert list(sampler(torch.tensor([[1.0, 1.00001, 0.0]]))) == [1]
    assert logits_to_probs(torch.tensor([[0.0, 3.0]]), temperature=0).tolist() == [[0.0, 1.0]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_scores_that_are_not_finite_are_one_line(bad):
    """A NaN or +inf score made every probability NaN and the draw token 256, which the next step's
    embedding refused with an IndexError (a model of NaN weights, an fp16 overflow)."""
    logits = torch.zeros(2, 256)
    logits[1, 7] = bad
    with pytest.raises(HtcliError, match=r"scores are not finite \(NaN or infinite\) for sample 2: its"):
        TokenSampler([SamplingConfig(temperature=1.0, seed=seed) for seed in (0, 1)])(logits)
    model = tiny_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(HtcliError, match="try dtype fp32, or another checkpoint"):
        list(generate(model, b"ab", SamplingConfig(3, temperature=1.0)))


def test_top_k_and_top_p_cut_each_row_on_its_own():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1], [0.1, 0.15, 0.25, 0.5]]))
    assert (logits_to_probs(logits, top_k=2) > 0).tolist() == [
        [True, True, False, False],
        [False, False, True, True],
    ]
    assert (logits_to_probs(logits, top_p=0.76) > 0).tolist() == [
        [True, True, True, False],
        [False, True, True, True],
    ]


def test_temperature_zero_is_greedy():
    """Temperature 0 always picks the most likely token."""
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 3.0, 2.9]])
    draw = TokenSampler([SamplingConfig(temperature=0, seed=seed) for seed in range(2)])
    assert {tuple(draw(logits)) for _ in range(5)} == {(1, 0)}


def test_inverse_cdf_lands_only_on_tokens_with_probability():
    """The ends of [0, 1) and the edges between intervals land on the right tokens, never on one of
    probability 0 (first or last), whatever the row's total."""
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.2, 0.2, 0.0]])
    for uniform, expected in [(0.0, [1, 1]), (0.4999, [1, 1]), (0.5, [2, 2]), (1 - 2**-53, [2, 2])]:
        assert inverse_cdf(probs, torch.tensor([uniform, uniform], dtype=torch.float64)).tolist() == expected


def test_draws_follow_the_probabilities():
    """20,000 draws of one row: each token's frequency within 5 standard errors of its probability
    (after temperature and top-k), tokens cut by top-k never drawn; a second row beside it is drawn
    from its own generator (the same tokens as alone)."""
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))
    config = SamplingConfig(temperature=0.7, top_k=4, seed=3)
    expected = logits_to_probs(logits, 0.7, 4)
    alone, pair = TokenSampler([config]), TokenSampler([config, SamplingConfig(temperature=1.0, seed=9)])
    draws = []
    for _ in range(20_000):
        token = alone(logits[None])[0]
        assert pair(torch.stack([logits, logits.flip(0)]))[0] == token
        draws.append(token)
    counts = torch.bincount(torch.tensor(draws), minlength=5).double() / len(draws)
    tolerance = 5 * (expected * (1 - expected) / len(draws)).sqrt() + 1e-9
    assert counts[4] == 0 and ((counts - expected).abs() <= tolerance).all(), (counts, expected)


def test_same_seed_same_bytes():
    """Generation is reproducible from its seed and depends on it."""
    model = tiny_model()
    run = lambda seed: list(generate(model, b"abc", SamplingConfig(40, temperature=1.0, seed=seed)))  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)
    assert all(0 <= t < 256 for t in run(1))


def test_recompute_path_uses_the_last_context():
    """Without the cache, next-token logits come from the model run on the last max_seq_len tokens."""
    model = tiny_model()
    tokens = torch.randint(0, 256, (1, 150))
    with torch.no_grad():
        expected = model(tokens[:, -64:])[0, -1]
        assert torch.allclose(Decoder(model, tokens, cache=False, dtype=torch.float32).logits[0], expected)
    greedy = list(generate(model, bytes(tokens[0].tolist()), SamplingConfig(5, temperature=0), cache=False))
    assert greedy[0] == int(expected.argmax())


def test_cache_and_recompute_agree_within_context():
    """Within max_seq_len the decode cache and recomputation give the same logits, byte after byte."""
    model = tiny_model()
    tokens = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        cached = Decoder(model, tokens, cache=True, dtype=torch.float32)
        recomputed = Decoder(model, tokens, cache=False, dtype=torch.float32)
        for token in torch.randint(0, 256, (54,)).tolist():
            assert torch.allclose(cached.logits, recomputed.logits, atol=1e-4)
            cached.feed([token])
            recomputed.feed([token])
        assert torch.allclose(cached.logits, recomputed.logits, atol=1e-4)


@pytest.mark.parametrize("attention", ["h", "exact"])
def test_cache_and_recompute_agree_past_the_context(attention):
    """Past max_seq_len recomputation reads the context the cache reads (cut to its last half when full),
    so that greedy decoding gives the same bytes with and without the cache (a sliding window of the last
    max_seq_len bytes gave others from the first byte past the context: --no-cache is the cache's check)."""
    torch.manual_seed(0)
    model = HTransformer1D(HTransformerConfig(**{**TINY_MODEL, "attention": attention})).eval()
    tokens = torch.randint(0, 256, (2, 50))
    with torch.no_grad():
        cached = Decoder(model, tokens, cache=True, dtype=torch.float32)
        recomputed = Decoder(model, tokens, cache=False, dtype=torch.float32)
        for token in torch.randint(0, 256, (150,)).tolist():  # (past 64 three times)
            assert torch.allclose(cached.logits, recomputed.logits, atol=1e-4)
            cached.feed([token, 255 - token])
            recomputed.feed([token, 255 - token])
        assert torch.allclose(cached.logits, recomputed.logits, atol=1e-4)
    greedy = SamplingConfig(200, temperature=0)
    assert list(generate(model, b"hello", greedy)) == list(generate(model, b"hello", greedy, cache=False))


@pytest.mark.parametrize("attention", ["h", "exact"])
def test_cache_reprefills_past_context(attention):
    """At max_seq_len the cached decoder re-prefills the last max_seq_len // 2 bytes, and goes on."""
    torch.manual_seed(0)
    model = HTransformer1D(HTransformerConfig(**{**TINY_MODEL, "attention": attention})).eval()
    window = model.config.max_seq_len
    tokens = torch.randint(0, 256, (1, window))
    with torch.no_grad():
        decoder = Decoder(model, tokens, cache=True, dtype=torch.float32)
        decoder.feed([7])
        context = torch.cat([tokens, tokens.new_tensor([[7]])], dim=1)
        assert torch.allclose(decoder.logits[0], model(context[:, -(window // 2) :])[0, -1], atol=1e-5)
        decoder.feed([9])
        context = torch.cat([context, context.new_tensor([[9]])], dim=1)
        assert torch.allclose(decoder.logits[0], model(context[:, -(window // 2 + 1) :])[0, -1], atol=1e-4)
    assert len(list(generate(model, b"x" * 70, SamplingConfig(80, temperature=1.0)))) == 80


def test_utf8_stream_never_splits_a_character():
    """Multi-byte characters fed byte by byte come out whole; invalid bytes become U+FFFD."""
    text = "héllo € 𝄞 end"
    stream = Utf8Stream()
    pieces = [stream.feed(b) for b in text.encode()] + [stream.flush()]
    assert "".join(pieces) == text
    assert all(piece.encode().decode() == piece for piece in pieces)
    assert "".join([stream.feed(b"\xff"), stream.feed(b"ok"), stream.flush()]) == "\ufffdok"
    tail = Utf8Stream()
    assert tail.feed(b"\xe2\x82") == "" and tail.flush() == "\ufffd"


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be a positive integer up to 256"),
        (dict(top_k=257), "top_k must be a positive integer up to 256"),  # (was taken, without effect)
        (dict(top_p=1.5), "top_p must be above 0 and at most 1"),
        (dict(top_p=0.0), "top_p must be above 0 and at most 1"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(temperature=math.inf), r"temperature must be a finite number >= 0 \(0: greedy\), got inf"),
        # (taken, and ignored, where the CLI refused them)
        (
            dict(temperature=0, top_k=3),
            "temperature 0 always takes the most likely byte: top_k would be ignored",
        ),
        (dict(temperature=0, top_k=3, top_p=0.5), "top_k and top_p would be ignored; drop them"),
    ],
)
def test_sampling_config_validation(options, message):
    """Impossible sampling options are refused with the field's name."""
    with pytest.raises(HtcliError, match=message):
        SamplingConfig(**options)


@pytest.mark.parametrize("stop", ["e", b"e", [b"e", "f"]])
def test_stop_strings_must_be_a_list_of_bytes(stop):
    """A str (or one bytes string, not in a list) as stop was a TypeError from bytes.endswith, or each of
    its bytes taken as a stop string: one line saying what stop takes."""
    model = tiny_model()
    with pytest.raises(HtcliError, match=r"stop must be a list of bytes \(such as \[b"):
        list(generate(model, b"abc", SamplingConfig(5), stop=stop))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("attention", ["h", "exact"])
@pytest.mark.parametrize("cache", [True, False])
def test_samples_decoded_together_equal_samples_decoded_alone(temperature, attention, cache):
    """Four samples in one batch (one prefill, batched steps; or recomputed, without the cache) are the
    four samples of their seeds, past the model's context too (re-prefilled)."""
    torch.manual_seed(0)
    model = HTransformer1D(HTransformerConfig(**{**TINY_MODEL, "attention": attention})).eval()
    top_k = 50 if temperature else None  # (greedy refuses it: void)
    configs = [SamplingConfig(80, temperature=temperature, top_k=top_k, seed=seed) for seed in range(4)]
    together = list(zip(*generate_batch(model, b"the cat " * 25, configs, cache=cache)))
    alone = [list(generate(model, b"the cat " * 25, c, cache=cache)) for c in configs]
    assert [list(row) for row in together] == alone


def test_stop_strings_end_each_sample_on_its_own():
    model = tiny_model()
    configs = [SamplingConfig(60, temperature=1.0, seed=seed) for seed in range(3)]
    free = [bytes(generate(model, b"ab", c)) for c in configs]
    stop = free[0][10:12]  # a stop string sample 0 produces at byte 12 (or before)
    ended = [
        bytes(t for t in row if t is not None)
        for row in zip(*generate_batch(model, b"ab", configs, stop=[stop]))
    ]
    for alone, stopped in zip(free, ended):
        cut = alone.find(stop)
        assert stopped == (alone if cut < 0 else alone[: cut + len(stop)])
    assert ended[0].endswith(stop) and len(ended[0]) <= 12


@pytest.mark.parametrize("dtype", ["bf16", None])
def test_a_dtype_by_name_is_refused_by_the_library(dtype):
    """generate (evaluate, train: one autocast) given "bf16", the CLI's name, ran in fp32 without a word."""
    model = HTransformer1D(HTransformerConfig(**TINY_MODEL)).eval()
    with pytest.raises(HtcliError, match=r"dtype must be a torch float dtype .*resolve_dtype turns a name"):
        list(generate(model, b"hi", SamplingConfig(3), dtype=dtype))


def test_wrong_types_are_refused_by_the_library():
    """A str prompt and a fractional top_k, max_new_tokens or seed ended in torch's errors."""
    model = HTransformer1D(HTransformerConfig(**TINY_MODEL)).eval()
    with pytest.raises(HtcliError, match=r"the prompt must be bytes \(text.encode\(\)\), got str"):
        list(generate(model, "hi", SamplingConfig(3)))
    with pytest.raises(
        HtcliError, match=r"must be a SamplingConfig \(SamplingConfig\(\*\*options\)\), got dict"
    ):
        list(generate(model, b"hi", {"max_new_tokens": 3}))  # (an AttributeError)
    # None (an AttributeError: the check took None for "none wrong"), when generate is called (it waited
    # for the first byte asked for); no config at all (the model's "copies ... >= 1")
    with pytest.raises(HtcliError, match=r"must be a SamplingConfig .*, got NoneType"):
        generate(model, b"hi", None)
    with pytest.raises(HtcliError, match="no SamplingConfig given: give one per sample"):
        generate_batch(model, b"hi", [])
    # one config to generate_batch ("not iterable"), an integer dtype (it ran in fp32, when called; review)
    with pytest.raises(
        HtcliError, match=r"configs is one SamplingConfig per sample: give a list, \[config\]"
    ):
        generate_batch(model, b"hi", SamplingConfig(3))
    for dtype in (torch.int64, torch.complex64):
        with pytest.raises(HtcliError, match=f"dtype must be a torch float dtype .*, got {dtype}"):
            generate(model, b"hi", SamplingConfig(3), dtype=dtype)
    for field, value in (("top_k", 2.5), ("max_new_tokens", 2.5), ("seed", 1.5), ("max_new_tokens", True)):
        with pytest.raises(HtcliError, match=f"{field} must be a whole number, got {value}"):
            SamplingConfig(**{field: value})
    with pytest.raises(HtcliError, match="temperature must be a number, got '0.5'"):
        SamplingConfig(temperature="0.5")


@pytest.mark.parametrize("length", [64, 60])
def test_exact_attention_kv_cache_equals_recomputation(length):
    """The exact-attention model decodes with its KV cache: logits equal the parallel forward at every
    position, and greedy samples equal recomputation within the context (60: no multiple of the block size,
    which exact attention does not need)."""
    torch.manual_seed(0)
    config = HTransformerConfig(**{**TINY_MODEL, "attention": "exact", "max_seq_len": length})
    model = HTransformer1D(config).eval()
    tokens = torch.randint(0, 256, (2, length))
    with torch.no_grad():
        expected = model(tokens)
        logits, state = model.prefill(tokens[:, :5])
        assert (logits - expected[:, :5]).abs().max() < 1e-4
        for t in range(5, length):
            assert (model.decode_step(tokens[:, t], state) - expected[:, t]).abs().max() < 1e-4
    greedy = SamplingConfig(length - 5, temperature=0)
    assert list(generate(model, b"hello", greedy)) == list(generate(model, b"hello", greedy, cache=False))
