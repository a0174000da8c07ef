"""Every layer rule against a batch-of-one reference, for every parameter tensor, including an empty batch."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_moso.scoring.layers import LAYER_RULES, ModuleCall, find_layer_rule, supported_layers
from hf_moso.scoring.row_gradients import (
    DenseRowGradient,
    EmbeddingRowGradient,
    GramCache,
    OuterProductRowGradient,
)


def _batch_norm(module_type, channels):
    module = module_type(channels)
    module.running_mean.normal_()
    module.running_var.uniform_(0.5, 2.0)
    module.weight.data.normal_()
    module.bias.data.normal_()
    return module.eval()


def _affine(module):
    # Non-trivial affine parameters, so that a rule that ignores them would fail.
    for tensor in module.parameters():
        tensor.data.normal_()
    return module


# (case id, module factory, input factory taking the batch size)
CASES = [
    ("linear_2d", lambda: nn.Linear(5, 4), lambda b: torch.randn(b, 5)),
    ("linear_positions", lambda: nn.Linear(5, 4), lambda b: torch.randn(b, 3, 5)),
    ("linear_two_position_dims", lambda: nn.Linear(5, 4, bias=False), lambda b: torch.randn(b, 2, 3, 5)),
    ("linear_wide_gram", lambda: nn.Linear(40, 30), lambda b: torch.randn(b, 2, 40)),
    ("transformers_conv1d", lambda: _affine(Conv1D(4, 5)), lambda b: torch.randn(b, 3, 5)),
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), lambda b: torch.randn(b, 4, 11)),
    ("conv1d_reflect", lambda: nn.Conv1d(3, 2, 3, padding=2, padding_mode="reflect"), lambda b: torch.randn(b, 3, 7)),
    ("conv1d_same_even_kernel", lambda: nn.Conv1d(2, 3, 4, padding="same"), lambda b: torch.randn(b, 2, 9)),
    ("conv2d", lambda: nn.Conv2d(2, 4, 3, padding=1), lambda b: torch.randn(b, 2, 6, 5)),
    (
        "conv2d_groups_stride_dilation",
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), groups=2, bias=False),
        lambda b: torch.randn(b, 4, 7, 6),
    ),
    (
        "conv2d_circular",
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        lambda b: torch.randn(b, 2, 5, 5),
    ),
    (
        "conv2d_same",
        lambda: nn.Conv2d(1, 2, 2, padding="same", padding_mode="replicate"),
        lambda b: torch.randn(b, 1, 5, 4),
    ),
    ("embedding", lambda: nn.Embedding(7, 3), lambda b: torch.randint(0, 7, (b, 9))),
    ("embedding_padding_idx", lambda: nn.Embedding(6, 4, padding_idx=0), lambda b: torch.randint(0, 6, (b, 8))),
    ("embedding_two_position_dims", lambda: nn.Embedding(5, 2), lambda b: torch.randint(0, 5, (b, 3, 4))),
    ("layer_norm", lambda: _affine(nn.LayerNorm(6)), lambda b: torch.randn(b, 4, 6)),
    ("layer_norm_two_dims", lambda: _affine(nn.LayerNorm((3, 4))), lambda b: torch.randn(b, 2, 3, 4)),
    ("layer_norm_no_bias", lambda: _affine(nn.LayerNorm(5, bias=False)), lambda b: torch.randn(b, 5)),
    ("rms_norm", lambda: _affine(nn.RMSNorm(6)), lambda b: torch.randn(b, 3, 6)),
    ("rms_norm_eps", lambda: _affine(nn.RMSNorm((2, 3), eps=1e-3)), lambda b: torch.randn(b, 2, 3)),
    ("group_norm", lambda: _affine(nn.GroupNorm(2, 4)), lambda b: torch.randn(b, 4, 5)),
    ("group_norm_2d", lambda: _affine(nn.GroupNorm(3, 6)), lambda b: torch.randn(b, 6, 3, 2)),
    ("batch_norm_1d", lambda: _batch_norm(nn.BatchNorm1d, 4), lambda b: torch.randn(b, 4)),
    ("batch_norm_1d_positions", lambda: _batch_norm(nn.BatchNorm1d, 3), lambda b: torch.randn(b, 3, 5)),
    ("batch_norm_2d", lambda: _batch_norm(nn.BatchNorm2d, 3), lambda b: torch.randn(b, 3, 4, 4)),
    ("batch_norm_3d", lambda: _batch_norm(nn.BatchNorm3d, 2), lambda b: torch.randn(b, 2, 2, 3, 2)),
]

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _reference(module, inputs, output_grad):
    """g_z of every parameter from a batch of one row: the gradient of sum(module(x_z) * b_z)."""
    names = [name for name, _ in module.named_parameters()]
    rows = {name: [] for name in names}
    for row in range(inputs.shape[0]):
        output = module(inputs[row : row + 1])
        grads = torch.autograd.grad((output * output_grad[row : row + 1]).sum(), list(module.parameters()))
        for name, grad in zip(names, grads):
            rows[name].append(grad)
    return {
        name: torch.stack(values) if values else torch.zeros(0, *dict(module.named_parameters())[name].shape)
        for name, values in rows.items()
    }


def _compare(label, actual, expected, rtol, mismatches):
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    if actual.shape != expected.shape:
        mismatches.append(f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
        return
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not torch.allclose(actual, expected, rtol=rtol, atol=rtol * scale):
        error = float((actual - expected).abs().max())
        mismatches.append(f"{label}: max abs error {error:.3g} (largest value {scale:.3g})")


def _check_rule(case, module, inputs, dtype) -> list[str]:
    module = module.to(dtype)
    inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
    output = module(inputs)
    output_grad = torch.randn_like(output)
    rule, reason = find_layer_rule(module)
    assert rule is not None, reason

    names = [name for name, _ in module.named_parameters()]
    gradients = rule.function(module, ModuleCall(args=(inputs,), kwargs={}, output_grad=output_grad), names)
    expected = _reference(module, inputs, output_grad)
    rtol = TOLERANCE[dtype]
    mismatches = []
    if sorted(gradients) != sorted(names):
        mismatches.append(f"{case}: rule returned {sorted(gradients)}, the module has {sorted(names)}")
    for name in sorted(set(gradients) & set(names)):
        gradient, reference = gradients[name], expected[name]
        label = f"{case} {dtype} {name}"
        mean = torch.randn(reference.shape[1:], dtype=dtype)
        _compare(f"{label} row gradients", gradient.materialize(), reference, rtol, mismatches)
        _compare(f"{label} dot", gradient.dot(mean), (reference * mean).flatten(1).sum(1), rtol, mismatches)
        _compare(f"{label} squared norm", gradient.squared_norm(), (reference**2).flatten(1).sum(1), rtol, mismatches)
        _compare(f"{label} sum over rows", gradient.sum_rows(), reference.sum(0), rtol, mismatches)
        dot, norm = gradient.statistics(mean, GramCache())
        _compare(f"{label} statistics dot", dot, (reference * mean).flatten(1).sum(1), rtol, mismatches)
        _compare(f"{label} statistics norm", norm, (reference**2).flatten(1).sum(1), rtol, mismatches)
    return mismatches


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_rules_match_batch_of_one(dtype):
    torch.manual_seed(0)
    mismatches = []
    for case, make_module, make_inputs in CASES:
        mismatches += _check_rule(case, make_module(), make_inputs(5), dtype)
    assert not mismatches, "Rules differ from the batch-of-one reference:\n" + "\n".join(mismatches)


def test_rules_on_empty_batch():
    torch.manual_seed(0)
    mismatches = []
    for case, make_module, make_inputs in CASES:
        mismatches += _check_rule(f"{case} (empty batch)", make_module(), make_inputs(0), torch.float64)
    assert not mismatches, "Rules fail on an empty batch:\n" + "\n".join(mismatches)


def test_every_registered_type_has_a_case():
    covered = {type(make_module()) for _, make_module, _ in CASES}
    missing = sorted(layer_type.__name__ for layer_type in LAYER_RULES if layer_type not in covered)
    assert not missing, f"Registered layer types without an oracle case: {missing}"


def test_supported_layers_lists_registry():
    names = supported_layers()
    assert "torch.nn.modules.linear.Linear" in names
    assert "transformers.pytorch_utils.Conv1D" in names
    assert len(names) == len({f"{t.__module__}.{t.__qualname__}" for t in LAYER_RULES})


def test_unsupported_configurations_have_no_rule():
    training_norm = nn.BatchNorm1d(3).train()
    no_running_stats = nn.BatchNorm1d(3, track_running_stats=False).eval()
    frequency_scaled = nn.Embedding(4, 2, scale_grad_by_freq=True)

    class ScaledLinear(nn.Linear):
        def forward(self, inputs):
            return 2.0 * super().forward(inputs)

    class PlainLinear(nn.Linear):
        pass

    for module in (training_norm, no_running_stats, frequency_scaled, ScaledLinear(2, 2), nn.PReLU()):
        rule, reason = find_layer_rule(module)
        assert rule is None, type(module).__name__
        assert reason
    rule, _ = find_layer_rule(PlainLinear(2, 2))
    assert rule is LAYER_RULES[nn.Linear]


def _forms(dtype=torch.float64):
    """Pairs of factored forms of one (V, H) = (6, 4) parameter, for 3 rows."""
    torch.manual_seed(1)
    outer = OuterProductRowGradient(torch.randn(3, 1, 5, 6, dtype=dtype), torch.randn(3, 1, 5, 4, dtype=dtype), (6, 4))
    other_outer = OuterProductRowGradient(
        torch.randn(3, 1, 2, 6, dtype=dtype), torch.randn(3, 1, 2, 4, dtype=dtype), (6, 4)
    )
    embedding = EmbeddingRowGradient(torch.randint(0, 6, (3, 7)), torch.randn(3, 7, 4, dtype=dtype), 6)
    other_embedding = EmbeddingRowGradient(torch.randint(0, 6, (3, 4)), torch.randn(3, 4, 4, dtype=dtype), 6)
    dense = DenseRowGradient(torch.randn(3, 6, 4, dtype=dtype))
    return {
        "outer": outer,
        "outer2": other_outer,
        "embedding": embedding,
        "embedding2": other_embedding,
        "dense": dense,
    }


def test_cross_terms_match_materialized():
    forms = _forms()
    mismatches = []
    for first_name, first in forms.items():
        for second_name, second in forms.items():
            expected = (first.materialize() * second.materialize()).flatten(1).sum(1)
            _compare(f"{first_name} . {second_name}", first.inner(second), expected, 1e-10, mismatches)
    assert not mismatches, "Cross terms differ from the materialized products:\n" + "\n".join(mismatches)


@pytest.mark.parametrize("prefer_gram", [True, False])
def test_outer_product_both_norm_forms(prefer_gram, monkeypatch):
    monkeypatch.setattr(OuterProductRowGradient, "_prefers_gram", lambda self: prefer_gram)
    monkeypatch.setattr(OuterProductRowGradient, "materialize_bytes", 200)
    torch.manual_seed(2)
    gradient = OuterProductRowGradient(
        torch.randn(4, 2, 3, 5, dtype=torch.float64), torch.randn(4, 2, 3, 2, dtype=torch.float64), (10, 2)
    )
    materialized = gradient.materialize()
    mean = torch.randn(10, 2, dtype=torch.float64)
    dot, norm = gradient.statistics(mean, GramCache())
    torch.testing.assert_close(norm, (materialized**2).flatten(1).sum(1))
    torch.testing.assert_close(dot, (materialized * mean).flatten(1).sum(1))
    torch.testing.assert_close(gradient.squared_norm(), (materialized**2).flatten(1).sum(1))


@pytest.mark.parametrize("prefer_gram", [True, False], ids=["unfolded_gram", "grouped_weight_gradient"])
def test_convolution_both_forms(prefer_gram, monkeypatch):
    from hf_moso.scoring.layers import convolution
    from hf_moso.scoring.row_gradients import ConvolutionRowGradient

    monkeypatch.setattr(convolution, "prefers_gram", lambda *shape: prefer_gram)
    # One row per chunk, so that the grouped weight-gradient form also runs over several chunks.
    monkeypatch.setattr(ConvolutionRowGradient, "materialize_bytes", 1)
    torch.manual_seed(4)
    mismatches = []
    for case, make_module, make_inputs in CASES:
        if case.startswith("conv"):
            for dtype in (torch.float64, torch.float32):
                mismatches += _check_rule(case, make_module(), make_inputs(5), dtype)
            mismatches += _check_rule(f"{case} (empty batch)", make_module(), make_inputs(0), torch.float64)
    assert not mismatches, "Convolution forms differ from the batch-of-one reference:\n" + "\n".join(mismatches)


def test_gram_cache_shares_one_input():
    torch.manual_seed(3)
    inputs = torch.randn(2, 1, 4, 3)
    cache = GramCache()
    first = cache.gram(inputs)
    assert cache.gram(inputs) is first
    assert cache.gram(inputs.clone()) is not first
