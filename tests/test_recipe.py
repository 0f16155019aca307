"""The training recipe: Muon, the model options, and checkpoints of the first recipe (htcli 0.1)."""

import json

import pytest
import torch
from conftest import TINY_FLAGS, assert_user_error, invoke, tiny_config
from safetensors import safe_open
from safetensors.torch import save_file

from htcli.checkpoint import CHECKSUM, load_model
from htcli.device import cpu_multiplies_bf16
from htcli.model import FIRST_RECIPE, HTransformer1D, HTransformerConfig
from htcli.optim import Muon, MuonAdamW, make_optimizer, orthogonalise

RECIPE_KEYS = list(FIRST_RECIPE)


def test_muon_takes_the_layers_matrices_and_adamw_the_rest(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path, optimizer="muon")
    model = HTransformer1D(config.model)
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, MuonAdamW)
    muon, adamw = optimizer.parts
    matrices = {id(p) for p in model.layers.parameters() if p.ndim == 2}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == matrices
    rest = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert id(model.token_emb.weight) in rest and id(model.to_logits.weight) in rest
    trained = {id(p) for p in model.parameters() if p.requires_grad}  # (rotary frequencies are fixed)
    assert rest | matrices == trained and not rest & matrices


def test_muon_state_dict_round_trips(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path, optimizer="muon")
    model = HTransformer1D(config.model)
    optimizer = make_optimizer(model, config)
    model(torch.randint(0, 256, (2, 64))).logsumexp(-1).mean().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    again = make_optimizer(HTransformer1D(config.model), config)
    again.load_state_dict(saved)
    restored = again.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for index, state in saved["state"].items():
        assert all(torch.equal(value, restored["state"][index][name]) for name, value in state.items())


@pytest.mark.parametrize(("nesterov", "adjust_lr_fn"), [(True, "match_rms_adamw"), (False, "original")])
def test_muon_batched_by_shape_updates_as_torchs_muon(nesterov, adjust_lr_fn):
    """htcli's Muon orthogonalises the matrices of one shape as one batch: the same parameters and
    momentum as torch.optim.Muon, step after step, for wide, tall and square matrices of several
    shapes, and their state dicts are interchangeable."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(24, 8), (8, 24), (16, 16), (24, 8), (8, 24), (16, 16), (24, 8), (5, 7)]
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    options = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    theirs = [p.clone().requires_grad_() for p in start]
    ours = [p.clone().requires_grad_() for p in start]
    reference, batched = torch.optim.Muon(theirs, **options), Muon(ours, **options)
    for _ in range(4):
        for a, b in zip(theirs, ours):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        reference.step()
        batched.step()
        for a, b in zip(theirs, ours):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert max((a - s).abs().max() for a, s in zip(theirs, start)) > 0.01  # (the steps did move them)
    saved = reference.state_dict()
    for index, state in batched.state_dict()["state"].items():
        torch.testing.assert_close(state["momentum_buffer"], saved["state"][index]["momentum_buffer"])
    resumed = Muon([p.detach().clone().requires_grad_() for p in theirs], **options)
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["param_groups"] == saved["param_groups"]


def test_muon_multiplies_in_fp32_where_bf16_is_emulated(corpus, tmp_path):
    """make_optimizer's Muon makes its Newton-Schulz products in bf16 where the device multiplies bf16 in
    hardware (as torch's Muon does), else in fp32 (emulated bf16 products took a recipe step from 86 to
    1,044 ms); fp32's are fp32 throughout: 1e-6 from fp64's, where bf16's are 1e-2 off."""
    config = tiny_config(corpus, tmp_path, optimizer="muon")
    muon = make_optimizer(HTransformer1D(config.model), config).parts[0]
    assert muon.products == (torch.bfloat16 if cpu_multiplies_bf16() else torch.float32)
    forced = make_optimizer(HTransformer1D(config.model), config, torch.float32)
    assert forced.parts[0].products == torch.float32
    matrices = torch.randn(3, 16, 48, generator=torch.Generator().manual_seed(0))
    exact, fp32, bf16 = (
        orthogonalise(matrices, muon.defaults["ns_coefficients"], 5, 1e-7, dtype).double()
        for dtype in (torch.float64, torch.float32, torch.bfloat16)
    )
    assert (fp32 - exact).abs().max() < 1e-5 < 1e-3 < (bf16 - exact).abs().max() < 0.05
    singular = torch.linalg.svdvals(fp32)
    assert 0.6 < singular.min() and singular.max() < 1.2  # (the quintic's band around 1)


def test_muon_refuses_what_torchs_refuses():
    """A vector added to a Muon group, or 100 Newton-Schulz steps: ValueError as from torch's Muon
    (was an IndexError, and a silent run of 100 iterations)."""
    muon = Muon([torch.nn.Parameter(torch.ones(4, 4))], lr=0.1)
    muon.add_param_group({"params": [torch.nn.Parameter(torch.ones(4))]})
    for group in muon.param_groups:
        for param in group["params"]:
            param.grad = torch.ones_like(param)
    with pytest.raises(ValueError, match="2-D matrices"):
        muon.step()
    slow = Muon([torch.nn.Parameter(torch.ones(4, 4))], lr=0.1, ns_steps=100)
    slow.param_groups[0]["params"][0].grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match="fewer than 100"):
        slow.step()


def test_a_run_keeps_its_optimizer_on_resume(corpus, tmp_path):
    run = tmp_path / "run"
    assert (
        invoke("train", corpus, *TINY_FLAGS, "--steps", "2", "--out", run, "--optimizer", "muon").exit_code
        == 0
    )
    result = invoke("train", "--out", run, "--resume", "--steps", "4", "--optimizer", "adamw")
    assert_user_error(
        result, "cannot resume a run trained with muon with --optimizer adamw: drop --optimizer"
    )


def strip_recipe(run) -> None:
    """Make run's files as htcli 0.1 wrote them: no recipe fields in any config, no optimizer choice."""
    path = run / "model.safetensors"
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    config = json.loads(metadata["htcli_config"])
    del metadata[CHECKSUM]  # (htcli 0.1 wrote none)
    metadata["htcli_config"] = json.dumps({k: v for k, v in config.items() if k not in RECIPE_KEYS})
    save_file(tensors, str(path), metadata)
    saved = json.loads((run / "config.json").read_text())
    saved["model"] = {k: v for k, v in saved["model"].items() if k not in RECIPE_KEYS}
    del saved["optimizer"]
    (run / "config.json").write_text(json.dumps(saved))


def test_first_recipe_checkpoints_load_sample_and_resume_as_what_they_are(corpus, tmp_path):
    """A checkpoint whose config predates the recipe fields is the model it was: LayerNorm, GELU, no
    QK-norm, no soft-cap, trained with AdamW; it loads, samples, evaluates and resumes as such."""
    run = tmp_path / "run"
    first = ["--optimizer", "adamw", "--norm", "layer", "--no-qk-norm", "--activation", "gelu"]
    first += ["--logit-softcap", "0", "--no-zero-init", "--level-decay", "0"]
    assert invoke("train", corpus, *TINY_FLAGS, "--steps", "2", "--out", run, *first).exit_code == 0
    expected, _ = load_model(run, torch.device("cpu"))
    strip_recipe(run)
    model, _ = load_model(run, torch.device("cpu"))
    assert {k: getattr(model.config, k) for k in RECIPE_KEYS} == FIRST_RECIPE
    tokens = torch.randint(0, 256, (1, 64))
    assert torch.equal(model(tokens), expected(tokens))
    sampled = invoke("sample", run, "--prompt", "the ", "--max-new-tokens", "5", "--device", "cpu")
    assert sampled.exit_code == 0, sampled.output
    assert invoke("eval", run, corpus, "--device", "cpu").exit_code == 0
    resumed = invoke("train", "--out", run, "--resume", "--steps", "3")
    assert resumed.exit_code == 0, resumed.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["optimizer"] == "adamw" and saved["model"]["norm"] == "layer"


def test_a_model_config_from_the_future_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="unknown model config keys: mixture_of_experts"):
        HTransformerConfig.from_dict({**HTransformerConfig().to_dict(), "mixture_of_experts": 8})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--norm", "batch"], "--norm must be one of rms, layer, got 'batch'"),
        (["--activation", "swish"], "--activation must be one of relu2, gelu, got 'swish'"),
        (["--logit-softcap", "-1"], "--logit-softcap must be a number >= 0 (0: none), got -1.0"),
        (["--optimizer", "sgd"], "unknown --optimizer 'sgd': use one of muon, adamw"),
        (["--level-decay", "-1"], "--level-decay must be a number from 0 (none) to 64.0, got -1.0"),
        (["--level-decay", "100"], "--level-decay must be a number from 0 (none) to 64.0, got 100.0"),
        (
            ["--attention", "exact", "--level-decay", "2"],
            "--level-decay is H-attention's: with --attention exact",
        ),
    ],
)
def test_bad_recipe_options(corpus, tmp_path, flags, message):
    assert_user_error(invoke("train", corpus, *TINY_FLAGS, "--out", tmp_path / "r", *flags), message)


def test_level_decay_per_head_and_in_old_configs():
    """New H-models get the default level decay (first head 16 bits per level, last 1, geometric between);
    exact-attention models none; a config written before the field (the recipe's fields present) is
    read as a model without it, as it was built."""
    from htcli.model import level_decays

    config = HTransformerConfig(heads=3)
    assert config.level_decay == 16.0 and level_decays(config) == pytest.approx((16.0, 4.0, 1.0))
    assert level_decays(HTransformerConfig(heads=1, level_decay=2.5)) == (2.5,)
    assert level_decays(HTransformerConfig(level_decay=0)) is None
    assert HTransformerConfig(attention="exact").level_decay == 0.0
    before = {k: v for k, v in HTransformerConfig().to_dict().items() if k != "level_decay"}
    assert HTransformerConfig.from_dict(before).level_decay == 0.0


def test_relu_squared_and_its_gradient():
    """The fused ReLU² equals relu(x)**2 and its gradient 2 relu(x) (gradcheck in fp64, zeros included)."""
    from htcli.model import ReluSquared

    x = torch.randn(6, 10, dtype=torch.float64)
    x[0, :3] = 0.0
    x.requires_grad_()
    assert torch.equal(ReluSquared()(x), torch.relu(x) ** 2)
    assert torch.autograd.gradcheck(ReluSquared(), (x,))
    (grad,) = torch.autograd.grad(ReluSquared()(x).sum(), x)
    assert torch.equal(grad, 2 * torch.relu(x))
