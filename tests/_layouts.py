"""The memory layouts the ops are tested in: the same values, other strides."""
import torch


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in another memory layout."""
    if layout == "channels_last":  # channel-minor (class-minor for probabilities)
        return t.contiguous(memory_format=torch.channels_last_3d if t.dim() == 5 else torch.channels_last)
    if layout == "sliced":  # every other element of a wider tensor along the last dim
        return _every_other(t, t.dim() - 1)
    if layout == "spatial_sliced":  # every other element along the first spatial dim
        return _every_other(t, 2)
    if layout == "class_sliced":  # every other channel of a tensor with twice as many
        return _every_other(t, 1)
    if layout == "permuted":
        return t.transpose(2, -1).contiguous().transpose(2, -1)
    raise ValueError(layout)


def _every_other(t, dim):
    shape = list(t.shape)
    shape[dim] *= 2
    wide = torch.zeros(shape, dtype=t.dtype)
    index = [slice(None)] * t.dim()
    index[dim] = slice(None, None, 2)
    wide[tuple(index)] = t
    return wide[tuple(index)]
