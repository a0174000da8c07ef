"""Rule for `torch.nn.Embedding`."""

from collections.abc import Collection

from torch import nn

from ..row_gradients import EmbeddingRowGradient, RowGradient
from .registry import ModuleCall, register_layer_rule, rows_by_positions


def _unsupported_embedding(module: nn.Embedding) -> str | None:
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq=True divides the gradient by index counts taken over the whole batch"
    return None


@register_layer_rule(nn.Embedding, unsupported=_unsupported_embedding)
def embedding_row_gradients(module: nn.Embedding, call: ModuleCall, names: Collection[str]) -> dict[str, RowGradient]:
    r"""
    Row gradients of the lookup y_s = E[i_s] at every position s of a row.

    Shapes: indices i (B, *S), output gradients b (B, *S, H), table E (V, H); the position dimensions are flattened
    to S. Positions whose index is `padding_idx` get no gradient, as in `torch.nn.functional.embedding`.

        g_E(z) = sum_s onehot(i[z, s]) b[z, s]^T                           (V, H)   embedding form

    so that gbar_E . g_E(z) = sum_s Gbar[i_s] . b_s, and |g_E(z)|^2 adds up the b_s that share an index before
    squaring.
    """
    if "weight" not in names:
        return {}
    indices = rows_by_positions(call.input(), 0)
    values = rows_by_positions(call.output_grad, 1)
    if module.padding_idx is not None:
        values = values.masked_fill((indices == module.padding_idx).unsqueeze(-1), 0.0)
    return {"weight": EmbeddingRowGradient(indices, values, module.num_embeddings)}
