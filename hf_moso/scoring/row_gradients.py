r"""
Every row's gradient of one parameter tensor, held in the cheapest exact form a layer allows.

A layer rule returns, for each of its parameters, a `RowGradient`: the gradients g_z of all B rows of a batch,
either factored (sums over positions of outer products, or of embedding rows) or materialized as a `(B, *shape)`
tensor. MoSo needs two numbers per row, and every form computes both without materializing what it does not have
to:

    dot(mean)[z]      = mean . g_z
    squared_norm()[z] = |g_z|^2

A parameter that receives gradient from several calls (a module called twice, or a weight tied between two
modules) has g_z = sum_i g_z^(i), so its squared norm also needs the cross terms `inner`:

    |g_z|^2 = sum_i |g_z^(i)|^2 + 2 * sum_{i<j} g_z^(i) . g_z^(j)

Einsum letters used below: b rows of the batch, g weight groups (convolution groups; 1 otherwise), s and t positions
of a row, p and q the two dimensions of a weight group, h the embedding dimension. Results are float64 tensors of
shape `(B,)`; products and sums are taken in the factors' dtype, and in float32 for float16 or bfloat16 factors.
"""

import math
from abc import ABC, abstractmethod

import torch


def _working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Return the dtype the products are taken in: the common dtype of the factors, at least float32."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return torch.promote_types(dtype, torch.float32)


def _row_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum every dimension but the first, returned in float64 (torch sums float32 in cascades, so no upcast)."""
    return values.reshape(values.shape[0], math.prod(values.shape[1:])).sum(dim=1).to(torch.float64)


def _row_dot(values: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """
    Return sum(values[z] * other[z]) per row z in float64, as one matrix product without a (B, ...) temporary.

    `other` has the shape of `values` or of one row of it (the same tensor for every row).
    """
    rows = values.shape[0]
    size = math.prod(values.shape[1:])
    flat = values.reshape(rows, size)
    if other.dim() == values.dim() - 1:
        return (flat @ other.reshape(size).to(flat.dtype)).to(torch.float64)
    return torch.einsum("bi,bi->b", flat, other.reshape(rows, size).to(flat.dtype)).to(torch.float64)


def prefers_gram(positions: int, size_p: int, size_q: int) -> bool:
    """
    Return True when the Gram form of |g_z|^2 costs less than forming g_z, for a sum of `positions` (S) outer
    products of sizes P and Q. The Gram form takes S^2 (P + Q) multiply-adds and forming g_z takes S P Q.
    """
    return positions * positions * (size_p + size_q) <= positions * size_p * size_q


def _chunks(num_rows: int, row_bytes: int, max_bytes: int):
    """Slices over `num_rows` rows with at most `max_bytes` bytes of `row_bytes` each (at least one row)."""
    step = max(1, max_bytes // max(1, row_bytes))
    for start in range(0, num_rows, step):
        yield slice(start, start + step)


class GramCache:
    """
    Gram matrices t @ t^T of the most recent factor tensors of one batch.

    The query, key and value projections of an attention layer read the same input, so its Gram matrix (B, S, S)
    is computed once. Entries are keyed by storage, shape and strides. Each entry keeps its tensor alive, so no
    other tensor can take the same address while the entry exists. The oldest entries are dropped first.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def gram(self, factor: torch.Tensor) -> torch.Tensor:
        key = (factor.data_ptr(), tuple(factor.shape), factor.stride(), factor.dtype, factor.device)
        entry = self._entries.pop(key, None)
        if entry is None:
            # The detached view keeps the storage alive without holding on to the autograd graph.
            entry = (factor.detach(), factor @ factor.transpose(-1, -2))
        self._entries[key] = entry
        while len(self._entries) > self.size:
            self._entries.pop(next(iter(self._entries)))
        return entry[1]


class RowGradient(ABC):
    """The gradients g_z of the B rows of a batch with respect to one parameter tensor of shape `shape`."""

    shape: torch.Size

    @property
    @abstractmethod
    def num_rows(self) -> int:
        """B, the number of rows."""

    @abstractmethod
    def dot(self, mean: torch.Tensor) -> torch.Tensor:
        """Return mean . g_z per row; `mean` has the parameter's shape, or `(B, *shape)` for one tensor per row."""

    @abstractmethod
    def squared_norm(self, grams: GramCache | None = None) -> torch.Tensor:
        """Return |g_z|^2 per row; `grams` shares Gram matrices between the forms of one batch."""

    @abstractmethod
    def sum_rows(self, rows: slice = slice(None)) -> torch.Tensor:
        """Return sum_z g_z over `rows`, a tensor of the parameter's shape."""

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Return the tensors of this form, to count the memory it keeps alive."""

    @abstractmethod
    def detach(self) -> "RowGradient":
        """Return the same form over detached tensors."""

    def statistics(self, mean: torch.Tensor, grams: GramCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(dot(mean), squared_norm())`; forms that materialize g_z share that work between the two."""
        return self.dot(mean), self.squared_norm(grams)

    def inner(self, other: "RowGradient") -> torch.Tensor:
        """Return g_z . g'_z per row for another form `other` of the same parameter."""
        if isinstance(other, DenseRowGradient):
            return self.dot(other.values)
        if isinstance(self, DenseRowGradient):
            return other.dot(self.values)
        result = self._factored_inner(other)
        if result is None:
            result = other._factored_inner(self)
        if result is None:
            result = _row_sum(self.materialize() * other.materialize())
        return result

    def _factored_inner(self, other: "RowGradient") -> torch.Tensor | None:
        """Cross term with `other` computed from the factors, or None when this form has no such formula."""
        return None

    @abstractmethod
    def materialize(self) -> torch.Tensor:
        """Return the gradients as one `(B, *shape)` tensor."""


class DenseRowGradient(RowGradient):
    """
    Materialized gradients: `values` of shape `(B, *shape)`, g_z = values[z].

        dot(mean)[z]      = sum values[z] * mean        (mean (*shape) or (B, *shape))
        squared_norm()[z] = sum values[z] ** 2
    """

    def __init__(self, values: torch.Tensor):
        self.values = values.to(_working_dtype(values))
        self.shape = values.shape[1:]

    @property
    def num_rows(self) -> int:
        return self.values.shape[0]

    def dot(self, mean: torch.Tensor) -> torch.Tensor:
        return _row_dot(self.values, mean)

    def squared_norm(self, grams: GramCache | None = None) -> torch.Tensor:
        return _row_dot(self.values, self.values)

    def sum_rows(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.values[rows].sum(dim=0)

    def materialize(self) -> torch.Tensor:
        return self.values

    def tensors(self) -> list[torch.Tensor]:
        return [self.values]

    def detach(self) -> "DenseRowGradient":
        return DenseRowGradient(self.values.detach())


class OuterProductRowGradient(RowGradient):
    r"""
    A sum of outer products over the positions of each row, per weight group:

        g_z[g] = sum_s left[z, g, s, :] right[z, g, s, :]^T          (P, Q), reshaped to `shape` (G * P * Q entries)

    with `left` of shape `(B, G, S, P)` and `right` of shape `(B, G, S, Q)`. For a linear layer W (O, I), `left` holds
    the output gradients b_s (P = O) and `right` the inputs a_s (Q = I).

        dot(M)[z]         = sum_{g,s} left[z,g,s]^T M[g] right[z,g,s]                            cost S P Q
        squared_norm()[z] = sum_{g,s,t} (left_s . left_t)(right_s . right_t)   (Gram form)      cost S^2 (P + Q)
                          = sum_g |left[z,g]^T right[z,g]|^2                   (materialized)   cost S P Q

    `squared_norm` takes whichever of the last two is cheaper for the shapes at hand; the materialized form works
    through the rows in chunks of at most `materialize_bytes` bytes.
    """

    materialize_bytes = 64 * 2**20

    def __init__(self, left: torch.Tensor, right: torch.Tensor, shape: torch.Size):
        if left.dim() != 4 or right.dim() != 4 or left.shape[:3] != right.shape[:3]:
            raise ValueError(
                f"The factors of an outer-product gradient must have shapes (B, G, S, P) and (B, G, S, Q) with equal "
                f"B, G and S, got {tuple(left.shape)} and {tuple(right.shape)}."
            )
        groups, size_p, size_q = left.shape[1], left.shape[3], right.shape[3]
        if groups * size_p * size_q != torch.Size(shape).numel():
            raise ValueError(
                f"Factors of shapes {tuple(left.shape)} and {tuple(right.shape)} do not form a gradient of shape "
                f"{tuple(shape)}."
            )
        dtype = _working_dtype(left, right)
        self.left = left.to(dtype)
        self.right = right.to(dtype)
        self.shape = torch.Size(shape)

    @property
    def num_rows(self) -> int:
        return self.left.shape[0]

    @property
    def _group_shape(self) -> tuple[int, int, int]:
        return self.left.shape[1], self.left.shape[3], self.right.shape[3]

    def _prefers_gram(self) -> bool:
        _, size_p, size_q = self._group_shape
        return prefers_gram(self.left.shape[2], size_p, size_q)

    def _row_chunks(self):
        groups, size_p, size_q = self._group_shape
        return _chunks(self.num_rows, groups * size_p * size_q * self.left.element_size(), self.materialize_bytes)

    def _materialize_rows(self, rows: slice) -> torch.Tensor:
        # (b, g, s, p)^T @ (b, g, s, q) -> (b, g, p, q)
        return self.left[rows].transpose(-1, -2) @ self.right[rows]

    def materialize(self) -> torch.Tensor:
        return self._materialize_rows(slice(None)).reshape(self.num_rows, *self.shape)

    def dot(self, mean: torch.Tensor) -> torch.Tensor:
        groups, size_p, size_q = self._group_shape
        if mean.dim() == len(self.shape):
            # (b, g, s, q) @ (g, q, p) -> (b, g, s, p)
            projected = self.right @ mean.reshape(groups, size_p, size_q).to(self.right.dtype).transpose(-1, -2)
        else:
            per_row = mean.reshape(self.num_rows, groups, size_p, size_q).to(self.right.dtype)
            projected = self.right @ per_row.transpose(-1, -2)
        return _row_dot(projected, self.left)

    def squared_norm(self, grams: GramCache | None = None) -> torch.Tensor:
        if self._prefers_gram():
            grams = grams if grams is not None else GramCache()
            return _row_dot(grams.gram(self.left), grams.gram(self.right))
        parts = []
        for rows in self._row_chunks():
            gradient = self._materialize_rows(rows)
            parts.append(_row_dot(gradient, gradient))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def statistics(self, mean: torch.Tensor, grams: GramCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._prefers_gram() or mean.dim() != len(self.shape):
            return self.dot(mean), self.squared_norm(grams)
        groups, size_p, size_q = self._group_shape
        mean = mean.reshape(groups, size_p, size_q).to(self.left.dtype)
        dots, norms = [], []
        for rows in self._row_chunks():
            gradient = self._materialize_rows(rows)
            dots.append(_row_dot(gradient, mean))
            norms.append(_row_dot(gradient, gradient))
        empty = torch.zeros(0, dtype=torch.float64)
        return (torch.cat(dots) if dots else empty), (torch.cat(norms) if norms else empty)

    def _factored_inner(self, other: RowGradient) -> torch.Tensor | None:
        if not isinstance(other, OuterProductRowGradient) or other._group_shape != self._group_shape:
            return None
        # sum_{g,s,t} (left_s . left'_t)(right_s . right'_t)
        left_gram = self.left @ other.left.transpose(-1, -2).to(self.left.dtype)
        right_gram = self.right @ other.right.transpose(-1, -2).to(self.right.dtype)
        return _row_dot(left_gram, right_gram)

    def sum_rows(self, rows: slice = slice(None)) -> torch.Tensor:
        left, right = self.left[rows], self.right[rows]
        return torch.einsum("bgsp,bgsq->gpq", left, right).reshape(self.shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.left, self.right]

    def detach(self) -> "OuterProductRowGradient":
        return OuterProductRowGradient(self.left.detach(), self.right.detach(), self.shape)


class ConvolutionRowGradient(RowGradient):
    r"""
    The weight gradients of a 2D convolution (a 1D one is given height 1), kept as the layer's inputs and output
    gradients and formed a chunk of rows at a time.

    Shapes: inputs x (B, C, H, W) already padded as the layer pads them, output gradients b (B, O, H', W'), weight
    (O, C/G, kh, kw) for G groups. Row z's gradient is the weight gradient of the convolution of x[z] alone,

        g_z = dW conv(x[z], W; stride, dilation, G) given output gradient b[z]              (O, C/G, kh, kw)

    A chunk of n rows is formed by one weight-gradient call of a convolution with n G groups. Its input stacks the
    chunk's rows along the channels, x as (1, n C, H, W) and b as (1, n O, H', W'). That is the same
    arithmetic as the unfolded outer-product form (cost L O C K / G per row for L output positions and K = kh kw),
    without writing the (C K, L) patches of every row to memory.

        dot(M)[z]         = sum g_z * M                                                    (M (O, C/G, kh, kw))
        squared_norm()[z] = sum g_z ** 2
    """

    materialize_bytes = 64 * 2**20

    def __init__(
        self,
        inputs: torch.Tensor,
        output_grad: torch.Tensor,
        shape: torch.Size,
        stride: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ):
        if inputs.dim() != 4 or output_grad.dim() != 4 or inputs.shape[0] != output_grad.shape[0]:
            raise ValueError(
                f"A convolution gradient needs inputs (B, C, H, W) and output gradients (B, O, H', W') with equal B, "
                f"got {tuple(inputs.shape)} and {tuple(output_grad.shape)}."
            )
        dtype = _working_dtype(inputs, output_grad)
        self.inputs = inputs.to(dtype)
        self.output_grad = output_grad.to(dtype)
        self.shape = torch.Size(shape)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)
        self.groups = groups

    @property
    def num_rows(self) -> int:
        return self.inputs.shape[0]

    def _weight_grad(self, inputs: torch.Tensor, output_grad: torch.Tensor, groups: int) -> torch.Tensor:
        """Compute the weight gradient of a convolution with `groups` groups (the weight's values are not read)."""
        channels_out, kernel = output_grad.shape[1], self.shape[2:]
        weight_shape = (channels_out, inputs.shape[1] // groups, *([1] * (2 - len(kernel))), *kernel)
        weight = output_grad.new_empty(1).expand(weight_shape)
        return torch.ops.aten.convolution_backward(
            output_grad,
            inputs,
            weight,
            None,
            list(self.stride),
            [0, 0],
            list(self.dilation),
            False,
            [0, 0],
            groups,
            [False, True, False],
        )[1]

    def _materialize_rows(self, rows: slice) -> torch.Tensor:
        inputs, output_grad = self.inputs[rows], self.output_grad[rows]
        count = inputs.shape[0]
        if count == 0:
            return inputs.new_zeros(0, *self.shape)
        stacked = self._weight_grad(
            inputs.reshape(1, -1, *inputs.shape[2:]),
            output_grad.reshape(1, -1, *output_grad.shape[2:]),
            count * self.groups,
        )
        return stacked.reshape(count, *self.shape)

    def _row_chunks(self):
        return _chunks(self.num_rows, self.shape.numel() * self.inputs.element_size(), self.materialize_bytes)

    def materialize(self) -> torch.Tensor:
        return self._materialize_rows(slice(None))

    def statistics(self, mean: torch.Tensor, grams: GramCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        per_row = mean.dim() != len(self.shape)
        mean = mean.to(self.inputs.dtype)
        dots, norms = [], []
        for rows in self._row_chunks():
            gradient = self._materialize_rows(rows)
            dots.append(_row_dot(gradient, mean[rows] if per_row else mean))
            norms.append(_row_dot(gradient, gradient))
        empty = torch.zeros(0, dtype=torch.float64)
        return (torch.cat(dots) if dots else empty), (torch.cat(norms) if norms else empty)

    def dot(self, mean: torch.Tensor) -> torch.Tensor:
        return self.statistics(mean)[0]

    def squared_norm(self, grams: GramCache | None = None) -> torch.Tensor:
        parts = [_row_dot(gradient, gradient) for gradient in map(self._materialize_rows, self._row_chunks())]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def sum_rows(self, rows: slice = slice(None)) -> torch.Tensor:
        inputs, output_grad = self.inputs[rows], self.output_grad[rows]
        if inputs.shape[0] == 0:
            return inputs.new_zeros(self.shape)
        return self._weight_grad(inputs, output_grad, self.groups).reshape(self.shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.inputs, self.output_grad]

    def detach(self) -> "ConvolutionRowGradient":
        return ConvolutionRowGradient(
            self.inputs.detach(), self.output_grad.detach(), self.shape, self.stride, self.dilation, self.groups
        )


class EmbeddingRowGradient(RowGradient):
    r"""
    The gradient of an embedding table E (V, H): each position s of row z adds `values[z, s]` to the row
    `indices[z, s]` of the table,

        g_z = sum_s onehot(indices[z, s]) values[z, s]^T                                          (V, H)

    with `indices` of shape `(B, S)` and `values` of shape `(B, S, H)`.

        dot(M)[z]         = sum_s M[indices[z, s]] . values[z, s]                                 cost S H
        squared_norm()[z] = sum_v |sum_{s: indices[z,s] = v} values[z, s]|^2                      cost S H + S log S

    The squared norm adds up the positions that share an index (found by sorting each row's indices) before
    squaring, so it never forms the (V, H) table per row.
    """

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, num_embeddings: int):
        if indices.dim() != 2 or values.dim() != 3 or indices.shape != values.shape[:2]:
            raise ValueError(
                f"An embedding gradient needs indices (B, S) and values (B, S, H), got {tuple(indices.shape)} and "
                f"{tuple(values.shape)}."
            )
        self.indices = indices
        self.values = values.to(_working_dtype(values))
        self.shape = torch.Size((num_embeddings, values.shape[2]))

    @property
    def num_rows(self) -> int:
        return self.values.shape[0]

    def _gather(self, table: torch.Tensor) -> torch.Tensor:
        """Rows of `table` (V, H), or of the per-row tables (B, V, H), at every position: (B, S, H)."""
        if table.dim() == 2:
            return table.to(self.values.dtype)[self.indices]
        index = self.indices.unsqueeze(-1).expand(-1, -1, table.shape[-1])
        return torch.gather(table.to(self.values.dtype), 1, index)

    def dot(self, mean: torch.Tensor) -> torch.Tensor:
        return _row_dot(self._gather(mean), self.values)

    def _coalesced(self) -> torch.Tensor:
        """(B, S, H): the values of positions sharing an index added into one slot per distinct index."""
        if self.indices.shape[1] == 0:
            return self.values
        sorted_indices, order = self.indices.sort(dim=1)
        starts = torch.ones_like(sorted_indices, dtype=torch.long)
        starts[:, 1:] = (sorted_indices[:, 1:] != sorted_indices[:, :-1]).long()
        slots = (starts.cumsum(dim=1) - 1).unsqueeze(-1).expand(-1, -1, self.values.shape[2])
        ordered = torch.gather(self.values, 1, order.unsqueeze(-1).expand(-1, -1, self.values.shape[2]))
        return torch.zeros_like(self.values).scatter_add_(1, slots, ordered)

    def squared_norm(self, grams: GramCache | None = None) -> torch.Tensor:
        coalesced = self._coalesced()
        return _row_dot(coalesced, coalesced)

    def _factored_inner(self, other: RowGradient) -> torch.Tensor | None:
        if other.shape != self.shape:
            return None
        if isinstance(other, EmbeddingRowGradient):
            # sum_{s,t} [i_s == i'_t] (values_s . values'_t)
            same = (self.indices.unsqueeze(2) == other.indices.unsqueeze(1)).to(self.values.dtype)
            return _row_sum(same * (self.values @ other.values.transpose(-1, -2).to(self.values.dtype)))
        if isinstance(other, OuterProductRowGradient) and other.left.shape[1] == 1:
            # A linear layer tied to this table (a language-model head): g' = sum_t left'_t right'_t^T (V, H), so
            # g . g' = sum_{s,t} left'_t[i_s] (values_s . right'_t).
            left = other.left[:, 0]
            picked = torch.gather(left, 2, self.indices.unsqueeze(1).expand(-1, left.shape[1], -1))
            return _row_sum(picked * (other.right[:, 0] @ self.values.transpose(-1, -2).to(other.right.dtype)))
        return None

    def sum_rows(self, rows: slice = slice(None)) -> torch.Tensor:
        values = self.values[rows]
        table = torch.zeros(self.shape, dtype=values.dtype, device=values.device)
        return table.index_add_(0, self.indices[rows].reshape(-1), values.reshape(-1, self.shape[1]))

    def materialize(self) -> torch.Tensor:
        table = torch.zeros(self.num_rows, *self.shape, dtype=self.values.dtype, device=self.values.device)
        index = self.indices.unsqueeze(-1).expand(-1, -1, self.shape[1])
        return table.scatter_add_(1, index, self.values)

    def tensors(self) -> list[torch.Tensor]:
        return [self.indices, self.values]

    def detach(self) -> "EmbeddingRowGradient":
        return EmbeddingRowGradient(self.indices.detach(), self.values.detach(), self.shape[0])
