"""PerLayerBackend against the row-at-a-time reference on tiny models: padding, tied weights, fallbacks, presets."""

import gc
import logging as std_logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_moso import NonFiniteLossError, PerLayerBackend, PerSampleGradientBackend, select_parameters
from hf_moso.parameters import ScoredParameters
from models import TinyCNN, image_dataset, pad_collator, tiny_bert, token_dataset


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move the weights off their initialization (zero biases, unit norms), so no rule passes by accident."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def _statistics(backend, model, batches, parameters, num_rows):
    model.eval()
    with torch.enable_grad():
        return backend.compute(model, batches, num_rows, parameters)


def _assert_statistics_match(actual, expected):
    for field in ("mean_dot", "squared_norm"):
        got, want = getattr(actual, field), getattr(expected, field)
        assert got.shape == want.shape, field
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * np.abs(want).max(), err_msg=field)


def _bert_batches(batch_size: int, num_rows: int = 11):
    dataset = token_dataset(num_rows=num_rows)
    batches = [
        pad_collator([dataset[index] for index in range(start, min(start + batch_size, num_rows))])
        for start in range(0, num_rows, batch_size)
    ]
    return lambda: iter(batches)


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=12, n_layer=2, n_head=2, tie_word_embeddings=True)
    return _perturb(GPT2LMHeadModel(config))


def _gpt2_batches(batch_size: int, num_rows: int = 7):
    generator = torch.Generator().manual_seed(1)
    rows = []
    for index in range(num_rows):
        length = 3 + index % 4
        rows.append(torch.randint(1, 40, (length,), generator=generator))
    batches = []
    for start in range(0, num_rows, batch_size):
        chunk = rows[start : start + batch_size]
        longest = max(len(row) for row in chunk)
        input_ids = torch.zeros(len(chunk), longest, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for index, row in enumerate(chunk):
            input_ids[index, : len(row)] = row
            attention_mask[index, : len(row)] = 1
            labels[index, : len(row)] = row
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return lambda: iter(batches)


@pytest.fixture
def captured_logs():
    """Messages logged by hf_moso, whatever the verbosity the user set."""
    records = []

    class Collector(std_logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collector(level=std_logging.INFO)
    library_logger = std_logging.getLogger("hf_moso")
    previous = library_logger.level
    library_logger.addHandler(handler)
    library_logger.setLevel(std_logging.INFO)
    yield records
    library_logger.removeHandler(handler)
    library_logger.setLevel(previous)


@pytest.mark.parametrize("batch_size", [1, 4, 11])
def test_bert_matches_reference_any_batching(batch_size):
    model = _perturb(tiny_bert())
    parameters = select_parameters(model)
    expected = _statistics(PerSampleGradientBackend(), model, _bert_batches(5), parameters, 11)

    backend = PerLayerBackend()
    actual = _statistics(backend, model, _bert_batches(batch_size), parameters, 11)

    _assert_statistics_match(actual, expected)
    plan = next(iter(backend._plans.values()))
    # Only the key biases, whose gradient vanishes (softmax ignores a shift shared by all keys), may leave the rules.
    demoted = {parameters.names[index] for index in plan.row_fallback}
    assert all(name.endswith("key.bias") for name in demoted), demoted


def test_bert_cache_and_recomputation_agree():
    model = _perturb(tiny_bert())
    parameters = select_parameters(model)
    batches = _bert_batches(4)

    cached_backend = PerLayerBackend(max_cache_bytes=2**30)
    cached = _statistics(cached_backend, model, batches, parameters, 11)
    streamed = _statistics(PerLayerBackend(max_cache_bytes=0), model, batches, parameters, 11)

    np.testing.assert_allclose(cached.mean_dot, streamed.mean_dot, rtol=1e-6)
    np.testing.assert_allclose(cached.squared_norm, streamed.squared_norm, rtol=1e-6)


def test_cache_not_reused_after_weights_change():
    model = _perturb(tiny_bert())
    parameters = ScoredParameters(["classifier.weight"], [model.classifier.weight], [0])
    batches = _bert_batches(4)
    backend = PerLayerBackend(max_cache_bytes=2**30)
    with torch.enable_grad():
        gradient_mean = [total / 11 for total in backend.gradient_sum(model, batches, parameters)]
        with torch.no_grad():
            model.classifier.weight.mul_(2.0)
        actual = backend.row_statistics(model, batches, parameters, gradient_mean)
        expected = PerSampleGradientBackend().row_statistics(model, batches, parameters, gradient_mean)

    _assert_statistics_match(actual, expected)


def test_gpt2_tied_embeddings_match_reference():
    model = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    parameters = select_parameters(model)
    assert parameters.names.count("transformer.wte.weight") == 1
    expected = _statistics(PerSampleGradientBackend(), model, _gpt2_batches(3), parameters, 7)

    backend = PerLayerBackend()
    actual = _statistics(backend, model, _gpt2_batches(4), parameters, 7)

    _assert_statistics_match(actual, expected)
    plan = next(iter(backend._plans.values()))
    tied_index = parameters.names.index("transformer.wte.weight")
    owners = [route.name for route in plan.routes if tied_index in route.parameters.values()]
    assert sorted(owners) == ["lm_head", "transformer.wte"]
    # Position ids are built with batch dimension 1; each row's share of the position table must still be exact.
    assert parameters.names.index("transformer.wpe.weight") not in plan.row_fallback


def test_bert_gradient_checkpointing_matches_reference():
    model = _perturb(tiny_bert(dropout=0.0))
    model.activation_checkpointing_enable()
    parameters = select_parameters(model)
    expected = _statistics(PerSampleGradientBackend(), model, _bert_batches(5), parameters, 11)

    actual = _statistics(PerLayerBackend(), model, _bert_batches(4), parameters, 11)

    _assert_statistics_match(actual, expected)


def _cross_entropy_rows(model, batch):
    return nn.functional.cross_entropy(model(**batch).logits, batch["labels"], reduction="none")


def _cnn_batches(batch_size: int, num_rows: int = 10):
    dataset = image_dataset(num_rows=num_rows)
    batches = []
    for start in range(0, num_rows, batch_size):
        rows = dataset[start : start + batch_size]
        batches.append({"pixel_values": rows["pixel_values"], "labels": rows["label"]})
    return lambda: iter(batches)


@pytest.mark.parametrize("row_loss_function", [None, _cross_entropy_rows], ids=["row_by_row", "batched"])
def test_cnn_matches_reference(row_loss_function):
    model = _perturb(TinyCNN())
    parameters = select_parameters(model)
    expected = _statistics(PerSampleGradientBackend(), model, _cnn_batches(4), parameters, 10)

    backend = PerLayerBackend(row_loss_function=row_loss_function)
    actual = _statistics(backend, model, _cnn_batches(3), parameters, 10)

    _assert_statistics_match(actual, expected)
    assert next(iter(backend._plans.values())).row_fallback == []


def test_wrong_row_loss_function_rejected():
    model = _perturb(TinyCNN())
    parameters = select_parameters(model)

    def summed_loss(model, batch):
        losses = _cross_entropy_rows(model, batch)
        return losses * 0 + losses.sum()

    with pytest.raises(ValueError, match="row_loss_function"):
        _statistics(PerLayerBackend(row_loss_function=summed_loss), model, _cnn_batches(4), parameters, 10)


class _Scale(nn.Module):
    """Multiplies by a learned per-feature scale: a module without a layer rule."""

    def __init__(self, size: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, size))

    def forward(self, hidden):
        return hidden * self.scale


class _Mixed(nn.Module):
    """A classifier that exercises every path: rules, torch.func on a module, a weight reused outside its module."""

    def __init__(self, reuse_weight: bool = False, shared_table: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.positions = nn.Linear(3, 6)
        self.scale = _Scale(6)
        self.prelu = nn.PReLU()
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.reuse_weight = reuse_weight
        self.shared_table = shared_table

    def forward(self, input_ids, labels=None):
        hidden = self.embed(input_ids)
        if self.shared_table:
            # One table for all rows, broadcast over the batch: its module output has no batch dimension.
            table = torch.linspace(-1, 1, input_ids.shape[1] * 3).reshape(input_ids.shape[1], 3)
            hidden = hidden + self.positions(table)
        hidden = self.prelu(self.scale(hidden))
        hidden = torch.tanh(self.hidden(hidden))
        if self.reuse_weight:
            # The same weight applied a second time outside its module's call.
            hidden = torch.tanh(nn.functional.linear(hidden, self.hidden.weight))
        logits = self.head(hidden.mean(dim=1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _mixed_batches(batch_size: int, num_rows: int = 9):
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 20, (num_rows, 5), generator=generator)
    labels = torch.arange(num_rows) % 3
    batches = [
        {"input_ids": input_ids[start : start + batch_size], "labels": labels[start : start + batch_size]}
        for start in range(0, num_rows, batch_size)
    ]
    return lambda: iter(batches)


def _used_parameters(model):
    return [name for name, _ in model.named_parameters() if not name.startswith("positions") or model.shared_table]


@pytest.mark.parametrize(
    "options, row_path",
    [
        ({}, set()),
        ({"reuse_weight": True}, {"hidden.weight"}),
        ({"shared_table": True}, {"positions.weight", "positions.bias"}),
    ],
    ids=["rules_and_torch_func", "weight_reused", "broadcast_table"],
)
def test_fallback_paths_match_reference(options, row_path, captured_logs):
    model = _perturb(_Mixed(**options))
    parameters = select_parameters(model, _used_parameters(model))
    expected = _statistics(PerSampleGradientBackend(), model, _mixed_batches(4), parameters, 9)

    backend = PerLayerBackend(row_loss_function=_cross_entropy_rows)
    actual = _statistics(backend, model, _mixed_batches(5), parameters, 9)

    _assert_statistics_match(actual, expected)
    plan = next(iter(backend._plans.values()))
    assert {parameters.names[index] for index in plan.row_fallback} == row_path
    fallbacks = sorted(route.name for route in plan.routes if route.rule is None)
    assert fallbacks == ["prelu", "scale"]
    torch_func_logs = [message for message in captured_logs if "torch.func on this module alone" in message]
    assert len(torch_func_logs) == 2
    if row_path:
        assert any("one row at a time" in message for message in captured_logs)


def test_head_preset_stops_backward_at_head():
    model = _perturb(tiny_bert())
    parameters = select_parameters(model, ["preset:head"])
    assert parameters.names == ["classifier.weight", "classifier.bias"]
    calls = []
    model.bert.encoder.layer[1].register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(1))

    expected = _statistics(PerSampleGradientBackend(), model, _bert_batches(5), parameters, 11)
    calls.clear()
    actual = _statistics(PerLayerBackend(max_cache_bytes=0), model, _bert_batches(4), parameters, 11)

    _assert_statistics_match(actual, expected)
    assert calls == []
    assert all(tensor.requires_grad for tensor in model.parameters())


def test_last_blocks_preset_matches_reference():
    model = _perturb(tiny_bert())
    parameters = select_parameters(model, ["preset:last_blocks:1"])
    assert all(not name.startswith(("bert.embeddings", "bert.encoder.layer.0.")) for name in parameters.names)
    assert "bert.encoder.layer.1.output.dense.weight" in parameters.names
    assert "bert.pooler.dense.weight" in parameters.names
    assert "classifier.weight" in parameters.names
    expected = _statistics(PerSampleGradientBackend(), model, _bert_batches(5), parameters, 11)

    actual = _statistics(PerLayerBackend(), model, _bert_batches(4), parameters, 11)

    _assert_statistics_match(actual, expected)


def test_lora_adapters_match_reference():
    peft = pytest.importorskip("peft")
    model = tiny_bert()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = peft.get_peft_model(model, config)
    _perturb(model)
    parameters = select_parameters(model, ["preset:adapters"])
    assert parameters.names and all("lora_" in name for name in parameters.names)
    expected = _statistics(PerSampleGradientBackend(), model, _bert_batches(5), parameters, 11)

    backend = PerLayerBackend()
    actual = _statistics(backend, model, _bert_batches(4), parameters, 11)

    _assert_statistics_match(actual, expected)
    assert next(iter(backend._plans.values())).row_fallback == []


def test_parameter_groups_kept_apart():
    model = _perturb(tiny_bert())
    named = dict(model.named_parameters())
    names = [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.1.intermediate.dense.weight",
        "classifier.bias",
    ]
    parameters = ScoredParameters(names, [named[name] for name in names], [0, 1, 1])
    expected = _statistics(PerSampleGradientBackend(), model, _bert_batches(5), parameters, 11)

    actual = _statistics(PerLayerBackend(), model, _bert_batches(4), parameters, 11)

    assert actual.mean_dot.shape == (11, 2)
    _assert_statistics_match(actual, expected)


def test_non_finite_loss_names_row():
    model = _perturb(TinyCNN())
    parameters = select_parameters(model)
    batches_list = list(_cnn_batches(4)())
    batches_list[1]["pixel_values"][2, 0, 0, 0] = float("nan")

    with pytest.raises(NonFiniteLossError) as error:
        _statistics(
            PerLayerBackend(row_loss_function=_cross_entropy_rows), model, lambda: iter(batches_list), parameters, 10
        )
    assert error.value.rows == [6]


def test_empty_batches_skipped():
    model = _perturb(TinyCNN())
    parameters = select_parameters(model)
    batches_list = list(_cnn_batches(5)())
    empty = {key: value[:0] for key, value in batches_list[0].items()}
    with_empty = lambda: iter([empty, batches_list[0], empty, batches_list[1]])  # noqa: E731
    expected = _statistics(PerSampleGradientBackend(), model, _cnn_batches(5), parameters, 10)

    actual = _statistics(PerLayerBackend(row_loss_function=_cross_entropy_rows), model, with_empty, parameters, 10)

    _assert_statistics_match(actual, expected)


def test_invalid_backend_arguments():
    with pytest.raises(TypeError, match="row_loss_function"):
        PerLayerBackend(row_loss_function="cross_entropy")
    with pytest.raises(ValueError, match="max_cache_bytes"):
        PerLayerBackend(max_cache_bytes=-1)


def test_unknown_preset_lists_valid_ones():
    model = tiny_bert()
    with pytest.raises(ValueError, match="preset:head.*preset:last_blocks"):
        select_parameters(model, ["preset:classifier"])
    with pytest.raises(ValueError, match="2 blocks|has 2"):
        select_parameters(model, ["preset:last_blocks:3"])
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        select_parameters(model, ["preset:adapters"])


class _Checkpointed(nn.Module):
    """A classifier whose middle block always runs under activation checkpointing, also in eval mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.block = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, labels=None):
        hidden = self.embed(input_ids)
        # Reentrant checkpointing does not support `torch.autograd.grad`, which every backend needs.
        hidden = torch.utils.checkpoint.checkpoint(self.block, hidden, use_reentrant=False)
        logits = self.head(hidden.mean(dim=1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def test_activation_checkpointing_in_forward():
    model = _perturb(_Checkpointed())
    parameters = select_parameters(model)
    expected = _statistics(PerSampleGradientBackend(), model, _mixed_batches(4), parameters, 9)

    backend = PerLayerBackend(row_loss_function=_cross_entropy_rows)
    actual = _statistics(backend, model, _mixed_batches(5), parameters, 9)

    _assert_statistics_match(actual, expected)
    assert next(iter(backend._plans.values())).row_fallback == []


@pytest.mark.parametrize("max_cache_bytes, passes", [(2**30, 1), (0, 2), (4096, 2)], ids=["fits", "off", "too_small"])
def test_cache_skips_second_forward_pass(max_cache_bytes, passes):
    model = _perturb(tiny_bert())
    parameters = select_parameters(model)
    backend = PerLayerBackend(max_cache_bytes=max_cache_bytes)
    _statistics(backend, model, _bert_batches(4), parameters, 11)
    forward_calls = []
    model.register_forward_hook(lambda module, args, output: forward_calls.append(1))

    _statistics(backend, model, _bert_batches(4), parameters, 11)

    assert len(forward_calls) == 3 * passes


def test_overflowed_cache_is_not_collected_again(monkeypatch):
    model = _perturb(tiny_bert())
    parameters = select_parameters(model)
    batches = _bert_batches(4)
    too_small, off = PerLayerBackend(max_cache_bytes=4096), PerLayerBackend(max_cache_bytes=0)
    first = _statistics(too_small, model, batches, parameters, 11)
    _statistics(off, model, batches, parameters, 11)
    rule_calls = []
    apply_rule = PerLayerBackend._apply_rule
    monkeypatch.setattr(
        PerLayerBackend, "_apply_rule", staticmethod(lambda call, sink: rule_calls.append(1) or apply_rule(call, sink))
    )

    second = _statistics(too_small, model, batches, parameters, 11)
    calls_with_small_cache = len(rule_calls)
    rule_calls.clear()
    _statistics(off, model, batches, parameters, 11)

    # The second snapshot runs the layer rules in pass 2 only, as without a cache, and gives the same statistics.
    assert calls_with_small_cache == len(rule_calls) > 0
    np.testing.assert_array_equal(second.mean_dot, first.mean_dot)
    np.testing.assert_array_equal(second.squared_norm, first.squared_norm)


def _live_tensor_bytes() -> int:
    gc.collect()
    storages = {}
    # Some objects that the collector tracks (deprecated torch aliases) warn when `isinstance` inspects them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [candidate for candidate in gc.get_objects() if isinstance(candidate, torch.Tensor)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("max_cache_bytes", [0, None], ids=["no_cache", "default_cache"])
def test_batches_release_activations(max_cache_bytes):
    model = _perturb(tiny_bert())
    parameters = select_parameters(model)
    batches = _bert_batches(4)
    backend = PerLayerBackend(max_cache_bytes=max_cache_bytes)
    _statistics(backend, model, batches, parameters, 11)
    zero_mean = [torch.zeros_like(tensor, dtype=torch.float64) for tensor in parameters.tensors]
    before = _live_tensor_bytes()

    _statistics(backend, model, batches, parameters, 11)
    with torch.enable_grad():
        backend.row_statistics(model, batches, parameters, zero_mean)

    # Nothing of the batches' activations, layer factors or graphs outlives the calls.
    assert _live_tensor_bytes() <= before


def test_config_rejects_unknown_preset(tmp_path):
    from hf_moso import MoSoConfig

    with pytest.raises(ValueError, match="preset:head.*preset:last_blocks"):
        MoSoConfig(output_dir=str(tmp_path), moso_parameters=["preset:heads"], use_cpu=True)
    with pytest.raises(ValueError, match="only `last_blocks` takes a count"):
        MoSoConfig(output_dir=str(tmp_path), moso_parameters=["preset:head:2"], use_cpu=True)
    entries = ["preset:last_blocks:2", "classifier.*"]
    config = MoSoConfig(output_dir=str(tmp_path), moso_parameters=entries, use_cpu=True)
    assert config.moso_parameters == entries
