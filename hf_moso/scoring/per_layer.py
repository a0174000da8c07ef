r"""
Fast exact backend: per-row gradient statistics from each layer's inputs and output gradients.

For a linear layer with inputs a_s and output gradients b_s at the positions s of a row, the row's weight gradient
is g = sum_s b_s a_s^T, so both numbers MoSo needs come without forming g:

    gbar . g_z = sum_s b_s^T Gbar a_s            |g_z|^2 = sum_{s,t} (a_s . a_t)(b_s . b_t)

One forward pass records each scored layer's inputs, and one backward pass of the summed row losses delivers
each layer's output gradients, which are per row because rows do not interact in eval mode. The rules in `layers`
turn them into row gradients in factored form (`row_gradients`). Parameters of layers without a rule go through
`torch.func` on their module alone, and parameters whose gradient no module call explains go one row at a time.
"""

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..parameters import ScoredParameters
from ..row_loss import batch_rows, count_rows, has_closed_form, row_losses, single_row_losses
from .base import (
    BatchFactory,
    GradientStatistics,
    GradientStatisticsBackend,
    raise_on_non_finite_losses,
    raise_on_non_finite_rows,
)
from .layers import ModuleCall
from .recording import RecordedCall, UnitRecorder
from .routing import ScoringPlan, build_plan
from .row_gradients import GramCache, RowGradient


logger = logging.get_logger(__name__)

RowLossFunction = Callable[[nn.Module, Mapping], torch.Tensor]
"""`row_loss_function(model, batch)` returns the loss of every row of `batch` alone, shape `(B,)`."""


class _StatisticsSink:
    """
    Adds every contribution g_z^(i) of a parameter to the rows' gbar . g_z and |g_z|^2 of its parameter group.

    A parameter with several contributions in the batch (a module called twice, a tied weight) keeps them until
    the last one arrives, for the cross terms 2 g^(i) . g^(j) of its squared norm.
    """

    def __init__(self, means, groups, num_groups, batch_size, expected_calls):
        self.means = means
        self.groups = groups
        self.expected_calls = expected_calls
        self.mean_dot = torch.zeros(batch_size, num_groups, dtype=torch.float64)
        self.squared_norm = torch.zeros(batch_size, num_groups, dtype=torch.float64)
        self.pending: dict[int, list[RowGradient]] = defaultdict(list)
        self.grams = GramCache()

    def add(self, index: int, gradient: RowGradient) -> None:
        mean, group = self.means[index], self.groups[index]
        pending = self.pending[index]
        if not pending and self.expected_calls.get(index, 1) <= 1:
            dot, norm = gradient.statistics(mean, self.grams)
        else:
            dot = gradient.dot(mean)
            norm = gradient.squared_norm(self.grams)
            for earlier in pending:
                norm = norm + 2.0 * gradient.inner(earlier)
            if len(pending) + 1 < self.expected_calls.get(index, 1):
                pending.append(gradient)
            else:
                self.pending.pop(index, None)
        self.mean_dot[:, group] += dot.cpu()
        self.squared_norm[:, group] += norm.cpu()


def _storage_bytes(gradient: RowGradient, storages: dict[int, int]) -> None:
    """Record the storages that `gradient` keeps alive, so that views of one activation count once."""
    for tensor in gradient.tensors():
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()


class _CollectSink:
    """
    Keeps every contribution, detached from the graph, to sum over rows or to reuse in the second pass.

    With `max_bytes`, collecting stops and what was kept is dropped as soon as the kept tensors exceed it. A batch
    too large for the cache therefore does not keep its row gradients alive to the end of the backward pass.
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.collected: dict[int, list[RowGradient]] = defaultdict(list)
        self.storages: dict[int, int] = {}
        self.overflowed = False

    def add(self, index: int, gradient: RowGradient) -> None:
        if self.overflowed:
            return
        self.collected[index].append(gradient.detach())
        if self.max_bytes is not None:
            _storage_bytes(gradient, self.storages)
            if sum(self.storages.values()) > self.max_bytes:
                self.overflowed = True
                self.collected.clear()
                self.storages.clear()


class _RowGradientCache:
    """
    The row gradients of every batch from the gradient-sum pass, so that the statistics pass needs no forward or
    backward pass. Valid only for the same `batches` factory, scored parameters and unchanged weights.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.units: list[tuple[int, dict[int, list[RowGradient]]]] = []
        self.storages: dict[int, int] = {}
        self.key = None

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def add(self, size: int, collected: dict[int, list[RowGradient]]) -> bool:
        """Keep one batch's row gradients; return False once they exceed `max_bytes`."""
        for gradients in collected.values():
            for gradient in gradients:
                _storage_bytes(gradient, self.storages)
        self.units.append((size, collected))
        return self.nbytes <= self.max_bytes


def _weights_key(model: nn.Module) -> tuple:
    """Identity and version of every parameter and buffer, which changes whenever a weight is written."""
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((tensor.data_ptr(), tensor._version) for tensor in tensors)


class PerLayerBackend(GradientStatisticsBackend):
    r"""
    Compute gbar . g_z and |g_z|^2 layer by layer, from each scored layer's inputs and output gradients.

    Pass 1 (`gradient_sum`) is a training-like backward pass of the summed row losses over the scored parameters.
    Pass 2 (`row_statistics`) runs one forward pass and one backward pass per batch. That backward pass stops at
    the earliest scored layer and computes no parameter gradient. Each layer's rule reduces its inputs and output
    gradients against gbar (see `layers` for the formulas and `row_gradients` for the Gram-or-materialize
    choice). Parameters that are not scored take no part in either pass.

    The first batch also checks the routing: for every scored parameter, the per-layer row gradients must add up to
    the autograd gradient of the batch, and row 0's must equal the autograd gradient of row 0's loss. A parameter
    that fails (it is used outside its module's call, or its module mixes rows) is scored one row at a time from
    then on, with a warning. Modules without a rule use `torch.func` on the module alone, logged once per module.

    When the row gradients of all rows fit in `max_cache_bytes`, pass 1 keeps them and pass 2 reuses them without
    running the model again; otherwise pass 2 recomputes them batch by batch.

    Args:
        row_loss_function: `row_loss_function(model, batch)` returning each row's loss alone, shape `(B,)`, for
            models whose per-row loss `row_losses` cannot compute in one batched forward pass (models other than
            transformers classification and language models). It is checked once against one forward pass per
            row on the first batch. Without it, such models run one forward pass per row.
        max_cache_bytes: memory the row gradients of pass 1 may take to be reused by pass 2; 0 turns the reuse
            off. Defaults to twice the memory of the model's parameters, less than the gradients and AdamW state
            (three times that memory) that a training step holds and scoring does not need. A linear layer keeps
            (I + O) floats per row and position. For MiniLM-L6 at 64 tokens that is an estimated 1.5 KB per row for
            the classifier head, 1.6 MB for the last block and 10 MB for the whole model, against a default of
            182 MB.

    Example:
        ```python
        backend = PerLayerBackend(
            row_loss_function=lambda model, batch: torch.nn.functional.cross_entropy(
                model(**batch).logits, batch["labels"], reduction="none"
            )
        )
        trainer = MoSoTrainer(model=cnn, args=config, train_dataset=train, scoring_backend=backend)
        ```
    """

    name = "per_layer"
    # Tolerance of the routing check, relative to the norm of the autograd gradient.
    check_tolerance = 1e-4

    def __init__(self, row_loss_function: RowLossFunction | None = None, max_cache_bytes: int | None = None):
        if row_loss_function is not None and not callable(row_loss_function):
            raise TypeError(f"`row_loss_function` must be callable as f(model, batch), got {row_loss_function!r}.")
        if max_cache_bytes is not None and (
            isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int) or max_cache_bytes < 0
        ):
            raise ValueError(f"`max_cache_bytes` must be a non-negative int or None, got {max_cache_bytes!r}.")
        self.row_loss_function = row_loss_function
        self.max_cache_bytes = max_cache_bytes
        self._plans: dict[tuple, ScoringPlan] = {}
        self._warned_row_by_row: set[int] = set()
        self._logged_no_cache = False
        self._cache: _RowGradientCache | None = None
        self._overflowed_key: tuple | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Passes

    def gradient_sum(
        self, model: nn.Module, batches: BatchFactory, parameters: ScoredParameters
    ) -> list[torch.Tensor]:
        self._cache = None
        gradient_sum = [torch.zeros_like(tensor, dtype=torch.float64) for tensor in parameters.tensors]
        max_cache_bytes = self.max_cache_bytes
        if max_cache_bytes is None:
            max_cache_bytes = 2 * sum(tensor.numel() * tensor.element_size() for tensor in model.parameters())
        # The size of the row gradients depends on the rows' shapes alone, so rows that overflowed the cache at one
        # snapshot overflow it at every snapshot. Later snapshots of those rows skip collecting, which would cost
        # pass 1 work for nothing.
        overflow_key = (batches, self._plan_key(model, parameters), max_cache_bytes)
        use_cache = max_cache_bytes > 0 and self._overflowed_key != overflow_key
        cache = _RowGradientCache(max_cache_bytes) if use_cache else None
        with self._scoring_mode(model, parameters):
            plan = self._plan(model, parameters)
            position = 0
            for unit in self._units(model, batches()):
                size = count_rows(unit)
                if size == 0:
                    continue
                self._check_row_loss_function(model, plan, unit)
                caching = cache is not None and not plan.row_fallback
                # The routing check needs every row gradient of its batch. Otherwise keep only what fits in the cache.
                budget = None
                if plan.validated:
                    budget = cache.max_bytes - cache.nbytes if caching else 0
                collect = not plan.validated or caching
                grads, sink = self._summed_unit(model, plan, parameters, unit, position, collect, budget)
                for total, grad in zip(gradient_sum, grads):
                    total += grad.to(torch.float64)
                if cache is not None:
                    if plan.row_fallback or sink.overflowed or not cache.add(size, sink.collected):
                        self._overflowed_key = overflow_key
                        if not self._logged_no_cache:
                            self._logged_no_cache = True
                            logger.info(
                                f"The row gradients take more than {max_cache_bytes:,} bytes (`max_cache_bytes`) or "
                                "some parameters are scored one row at a time, so the statistics pass runs the model "
                                "again."
                            )
                        cache = None
                position += size
        if cache is not None:
            cache.key = (batches, self._plan_key(model, parameters), _weights_key(model))
            self._cache = cache
        return gradient_sum

    def row_statistics(
        self, model: nn.Module, batches: BatchFactory, parameters: ScoredParameters, gradient_mean: list[torch.Tensor]
    ) -> GradientStatistics:
        means = [
            mean.to(device=tensor.device, dtype=tensor.dtype)
            for mean, tensor in zip(gradient_mean, parameters.tensors)
        ]
        mean_dot, squared_norm = [], []
        cache, self._cache = self._cache, None
        with self._scoring_mode(model, parameters):
            plan = self._plan(model, parameters)
            key = (batches, self._plan_key(model, parameters), _weights_key(model))
            if cache is not None and cache.key == key and not plan.row_fallback:
                for size, collected in cache.units:
                    dot, norm = self._cached_unit_statistics(collected, means, parameters, size)
                    mean_dot.append(dot)
                    squared_norm.append(norm)
            else:
                position = 0
                for unit in self._units(model, batches()):
                    size = count_rows(unit)
                    if size == 0:
                        continue
                    self._check_row_loss_function(model, plan, unit)
                    if not plan.validated:
                        self._summed_unit(model, plan, parameters, unit, position, collect=True)
                    dot, norm = self._unit_statistics(model, plan, parameters, unit, position, means)
                    mean_dot.append(dot)
                    squared_norm.append(norm)
                    position += size

        empty = np.zeros((0, parameters.num_groups), dtype=np.float64)
        mean_dot = np.concatenate([values.numpy() for values in mean_dot]) if mean_dot else empty
        squared_norm = np.concatenate([values.numpy() for values in squared_norm]) if squared_norm else empty
        raise_on_non_finite_rows(mean_dot, squared_norm)
        return GradientStatistics(mean_dot=mean_dot, squared_norm=squared_norm)

    def compute(
        self, model: nn.Module, batches: BatchFactory, num_rows: int, parameters: ScoredParameters
    ) -> GradientStatistics:
        # The same two passes as the base class, dividing in place so that only one float64 copy of gbar exists.
        gradient_mean = self.gradient_sum(model, batches, parameters)
        for total in gradient_mean:
            total /= num_rows
        return self.row_statistics(model, batches, parameters, gradient_mean)

    # ----------------------------------------------------------------------------------------------------------
    # One batch

    def _forward(self, model, plan, unit, recorder: UnitRecorder | None) -> torch.Tensor:
        if recorder is None:
            return self._row_losses(model, unit)
        with recorder.hooks(), recorder.forward_pass():
            return self._row_losses(model, unit)

    def _record(self, model, plan, parameters, unit, on_complete) -> tuple[torch.Tensor, UnitRecorder, torch.Tensor]:
        """Run the forward pass with hooks, moving modules that turn out not to be row-wise to the row path first."""
        size = count_rows(unit)
        while True:
            anchor = torch.zeros((), dtype=torch.float32, device=parameters.tensors[0].device, requires_grad=True)
            recorder = UnitRecorder(plan, size, anchor, on_complete)
            losses = self._forward(model, plan, unit, recorder)
            if not recorder.not_row_wise:
                return losses, recorder, anchor
            recorder.close()
            for route in list(plan.routes):
                if route.name in recorder.not_row_wise:
                    reason = f"`{route.name}` cannot be split into rows: {recorder.not_row_wise[route.name]}"
                    plan.demote(set(route.parameters.values()), parameters.names, reason)

    def _summed_unit(self, model, plan, parameters, unit, position, collect: bool, max_bytes: int | None = None):
        """
        Return the autograd gradient of the summed row losses of one batch, and a sink that contains every row
        gradient of the routed parameters when `collect` is set (up to `max_bytes`). On the plan's first batch this
        also checks the routing.
        """
        sink = _CollectSink(max_bytes if collect else 0)
        checking = not plan.validated

        def on_complete(call: RecordedCall) -> None:
            self._apply_rule(call, sink)

        if collect:
            losses, recorder, anchor = self._record(model, plan, parameters, unit, on_complete)
        else:
            losses, recorder, anchor = self._forward(model, plan, unit, None), None, None
        raise_on_non_finite_losses(losses, position)

        first_row = None
        if checking and losses.shape[0] > 1:
            first_row = self._parameter_grads(losses[0], parameters.tensors, retain_graph=True)
        inputs = list(parameters.tensors) + ([anchor] if recorder is not None and recorder.calls else [])
        if recorder is None:
            grads = self._parameter_grads(losses.sum(), inputs, retain_graph=False)
        else:
            with recorder.backward_pass():
                grads = self._parameter_grads(losses.sum(), inputs, retain_graph=False)
            for call in recorder.fallback_calls:
                self._apply_fallback(call, sink, losses.shape[0])
            recorder.close()
        grads = grads[: len(parameters.tensors)]

        if checking:
            self._check_routing(plan, parameters, sink.collected, grads, first_row, losses.shape[0])
        return grads, sink

    def _unit_statistics(self, model, plan, parameters, unit, position, means):
        """Return gbar . g_z and |g_z|^2 per parameter group for the rows of one batch, each `(B, G)` float64."""
        size = count_rows(unit)
        sink = None

        def on_complete(call: RecordedCall) -> None:
            self._apply_rule(call, sink)

        losses, recorder, anchor = self._record(model, plan, parameters, unit, on_complete)
        raise_on_non_finite_losses(losses, position)
        expected_calls = dict(recorder.calls_per_parameter)
        sink = _StatisticsSink(means, parameters.groups, parameters.num_groups, size, expected_calls)

        if recorder.calls:
            with recorder.backward_pass():
                torch.autograd.grad(losses.sum(), [anchor], retain_graph=bool(plan.row_fallback), allow_unused=True)
            for call in recorder.fallback_calls:
                self._apply_fallback(call, sink, size)
        recorder.close()

        if plan.row_fallback:
            tensors = [parameters.tensors[index] for index in plan.row_fallback]
            row_means = [means[index].to(torch.float64) for index in plan.row_fallback]
            for row in range(size):
                grads = self._parameter_grads(losses[row], tensors, retain_graph=row < size - 1)
                for index, grad, mean in zip(plan.row_fallback, grads, row_means):
                    group = parameters.groups[index]
                    grad = grad.to(torch.float64)
                    sink.mean_dot[row, group] += float(torch.sum(grad * mean))
                    sink.squared_norm[row, group] += float(torch.sum(grad * grad))
        return sink.mean_dot, sink.squared_norm

    def _cached_unit_statistics(self, collected, means, parameters, size):
        expected = {index: len(gradients) for index, gradients in collected.items()}
        sink = _StatisticsSink(means, parameters.groups, parameters.num_groups, size, expected)
        with torch.autocast(device_type=parameters.tensors[0].device.type, enabled=False):
            for index, gradients in collected.items():
                for gradient in gradients:
                    sink.add(index, gradient)
        return sink.mean_dot, sink.squared_norm

    # ----------------------------------------------------------------------------------------------------------
    # Helpers

    @staticmethod
    def _parameter_grads(output: torch.Tensor, inputs: list[torch.Tensor], retain_graph: bool) -> list[torch.Tensor]:
        grads = torch.autograd.grad(output, inputs, retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(tensor) if grad is None else grad for grad, tensor in zip(grads, inputs)]

    @staticmethod
    def _apply_rule(call: RecordedCall, sink) -> None:
        route = call.route
        output_grad = call.output_grads[0]
        module_call = ModuleCall(args=call.args, kwargs=call.kwargs, output_grad=output_grad)
        # The rules' products must not be cast down by a mixed-precision autocast around the backward pass.
        with torch.autocast(device_type=output_grad.device.type, enabled=False):
            gradients = route.rule.function(route.module, module_call, route.parameters.keys())
            call.release()
            for local, gradient in gradients.items():
                sink.add(route.parameters[local], gradient)

    @staticmethod
    def _apply_fallback(call: RecordedCall, sink, batch_size: int) -> None:
        route = call.route
        gradients = route.fallback(list(route.parameters), call.args, call.kwargs, call.output_grads, batch_size)
        call.release()
        device_type = next(iter(gradients.values())).values.device.type if gradients else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            for local, gradient in gradients.items():
                sink.add(route.parameters[local], gradient)

    def _check_routing(self, plan, parameters, collected, grads, first_row, size) -> None:
        """
        Move to the row path every parameter whose per-layer row gradients do not match autograd.

        A difference passes when it is at most `check_tolerance` of the parameter's own gradient norm, or at most
        1e-6 of the norm of the whole gradient. The second bound admits parameters whose gradient vanishes, such as
        the key bias of attention (zero up to rounding, since softmax ignores a shift shared by all keys): their
        relative error is rounding noise, and an error that small cannot change the scores.
        """
        whole = float(torch.sqrt(sum(torch.sum(grad.double() ** 2) for grad in grads)))
        failed: dict[int, str] = {}
        routed = {index for route in plan.routes for index in route.parameters.values()}
        for index in sorted(routed):
            gradients = collected.get(index, [])
            total = sum((gradient.sum_rows() for gradient in gradients), torch.zeros_like(grads[index]))
            checks = [(total, grads[index])]
            if first_row is not None:
                row = sum((gradient.sum_rows(slice(0, 1)) for gradient in gradients), torch.zeros_like(grads[index]))
                checks.append((row, first_row[index]))
            for actual, expected in checks:
                difference = float(torch.linalg.vector_norm((actual.double() - expected.double()).reshape(-1)))
                scale = float(torch.linalg.vector_norm(expected.double().reshape(-1)))
                if not difference <= max(self.check_tolerance * scale, 1e-6 * whole):
                    failed[index] = f"{difference / scale if scale > 0 else float('inf'):.2g}"
                    break
        if failed:
            errors = ", ".join(f"{parameters.names[index]}: {error}" for index, error in failed.items())
            plan.demote(
                set(failed),
                parameters.names,
                "their per-layer row gradients differ from autograd on the first batch (relative error "
                f"{errors}); the parameter is probably used outside its module's call",
            )
        plan.validated = True

    def _plan_key(self, model: nn.Module, parameters: ScoredParameters) -> tuple:
        return (id(model), tuple(id(tensor) for tensor in parameters.tensors))

    def _plan(self, model: nn.Module, parameters: ScoredParameters) -> ScoringPlan:
        key = self._plan_key(model, parameters)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(model, parameters)
            self._plans = {key: plan}
        return plan

    def _row_losses(self, model: nn.Module, batch: Mapping) -> torch.Tensor:
        if self.row_loss_function is None:
            return row_losses(model, batch)
        losses = self.row_loss_function(model, batch)
        size = count_rows(batch)
        if not torch.is_tensor(losses) or losses.shape != (size,):
            shape = tuple(losses.shape) if torch.is_tensor(losses) else type(losses).__name__
            raise ValueError(
                f"`row_loss_function` must return one loss per row, a tensor of shape ({size},), got {shape}."
            )
        return losses

    def _batched_losses(self, model: nn.Module, batch: Mapping) -> bool:
        return self.row_loss_function is not None or (has_closed_form(model) and "labels" in batch)

    def _units(self, model: nn.Module, batches: Iterator[Mapping]) -> Iterator[Mapping]:
        """Yield the batches, split into single rows when the row losses need one forward pass per row anyway."""
        for batch in batches:
            if self._batched_losses(model, batch):
                yield batch
                continue
            if id(model) not in self._warned_row_by_row:
                self._warned_row_by_row.add(id(model))
                logger.warning(
                    f"{type(model).__name__} has no batched per-row loss (see `row_losses`), so every row runs its "
                    "own forward pass. Pass `row_loss_function=` to `PerLayerBackend` to score whole batches at once."
                )
            yield from batch_rows(batch)

    def _check_row_loss_function(self, model: nn.Module, plan: ScoringPlan, batch: Mapping) -> None:
        """Compare `row_loss_function` with the model's own loss on each row alone, once per plan."""
        if self.row_loss_function is None or plan.row_loss_checked:
            return
        with torch.no_grad():
            returned = self._row_losses(model, batch).double()
            expected = single_row_losses(model, batch).double()
        tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
        wrong = torch.nonzero((returned - expected).abs() > tolerance).flatten().tolist()
        if wrong:
            listed = [f"row {row}: {float(returned[row]):.6g} vs {float(expected[row]):.6g}" for row in wrong[:5]]
            shown = ", ".join(listed)
            raise ValueError(
                f"`row_loss_function` does not return the model's own loss of each row alone on the first batch "
                f"({shown}). It must match `model(**row).loss` for a batch of that one row; fix the function or leave "
                "it unset."
            )
        plan.row_loss_checked = True

    @contextlib.contextmanager
    def _scoring_mode(self, model: nn.Module, parameters: ScoredParameters):
        """Differentiate only the scored parameters: the others take no part in the backward pass or its graph."""
        scored = {id(tensor) for tensor in parameters.tensors}
        flags = [(tensor, tensor.requires_grad) for tensor in model.parameters()]
        try:
            for tensor, _ in flags:
                tensor.requires_grad_(id(tensor) in scored)
            yield
        finally:
            for tensor, flag in flags:
                tensor.requires_grad_(flag)
