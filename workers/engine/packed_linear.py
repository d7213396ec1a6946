"""Linear layers with weights pre-packed for the CPU's matmul kernels (oneDNN), as torch.compile's freezing does.

A decode step multiplies a few rows by every weight matrix of the model. With the weights in their plain
[out, in] layout, the kernel repacks them on each call and a batch-16 step reaches about a third of the CPU's
matmul speed; packed once at load, the same step runs about twice as fast and the LM head about three times.
The packed weight replaces the plain one, except that an LM head tied to the input embeddings gets its own
packed copy (the embedding lookup still needs the plain rows). A checkpoint loaded from safetensors is
memory-mapped: every weight is a view of the file's mapping, and the mapping stays resident, all of it once
packing has read every weight, for as long as one view lives. So after packing, the weights left plain (the
embedding, the norms) are copied into memory of their own, and the mapping of the replaced weights goes away.

oneDNN keeps some memory for every distinct number of rows it has multiplied a packed weight by, so inputs are
cut into blocks of at most `block_rows` rows: a prefill of any length then costs no more memory than a decode
step. On a 2-core AVX2 CPU, blocks of 32 rows ran the default model a quarter faster than blocks of 16 for the
same memory (about 30 MB of such buffers), and larger blocks were no faster while the LM head's buffers grew
(about 250 MB for blocks of 64, 1.1 GB for 128). Within a block each row's result does not
depend on the other rows, except that oneDNN multiplies a single row with a kernel of its own: a lone row is
therefore sent with a copy of itself, so that a token's numbers never depend on what shares its step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BLOCK_ROWS = 32


class PackedLinear(torch.nn.Module):
    """nn.Linear's computation over a oneDNN-packed float32 weight, `block_rows` input rows at a time."""

    def __init__(self, linear: torch.nn.Linear, block_rows: int = DEFAULT_BLOCK_ROWS):
        super().__init__()
        self.in_features, self.out_features, self.block_rows = linear.in_features, linear.out_features, block_rows
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), block_rows))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        blocks = [self._multiply(rows[start : start + self.block_rows]) for start in range(0, rows.shape[0], self.block_rows)]
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        return out.view(*x.shape[:-1], self.out_features)

    def _multiply(self, rows: torch.Tensor) -> torch.Tensor:
        # rows: [M, in], M <= block_rows -> [M, out]
        if rows.shape[0] == 1:
            return torch.ops.mkldnn._linear_pointwise(rows.expand(2, -1), self.weight, self.bias, "none", [None], "")[:1]
        return torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [None], "")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_rows={self.block_rows}"
        )


def packing_available(model: torch.nn.Module) -> bool:
    """Whether packing applies: a float32 model on the CPU, with oneDNN in this torch build."""
    return (
        torch.backends.mkldnn.is_available()
        and next(model.parameters()).device.type == "cpu"
        and next(model.parameters()).dtype == torch.float32
    )


@dataclass(frozen=True)
class Packing:
    replaced: int
    """Linear layers now packed."""
    added_bytes: int
    """Memory added: packed copies of weights that another module (a tied embedding) still holds plainly."""


@torch.no_grad()
def pack_linears(model: torch.nn.Module, block_rows: int = DEFAULT_BLOCK_ROWS) -> Packing:
    """Replace every plain float32 nn.Linear of `model` by a PackedLinear, in place.

    Quantized linears (bitsandbytes and others subclass nn.Linear) are left alone, and so is a model that is
    not a float32 one on the CPU. Calling it again replaces nothing more.
    """
    if not packing_available(model):
        return Packing(0, 0)
    held_elsewhere = {
        parameter.data_ptr()
        for module in model.modules()
        if not isinstance(module, torch.nn.Linear)
        for parameter in module.parameters(recurse=False)
    }
    replaced = added = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                if child.weight.data_ptr() in held_elsewhere:
                    added += child.weight.numel() * child.weight.element_size()
                setattr(parent, name, PackedLinear(child, block_rows))
                replaced += 1
    if replaced:
        own_plain_tensors(model)
    return Packing(replaced, added)


def own_plain_tensors(model: torch.nn.Module) -> None:
    """Copy every parameter and buffer outside the packed layers into memory of its own, so that nothing keeps the
    memory-mapped checkpoint (or any storage shared with the replaced weights) alive."""
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            continue
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None and id(tensor) not in done:
                done.add(id(tensor))
                tensor.data = tensor.data.clone()
