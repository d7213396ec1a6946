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

Weights come in three formats (weight_formats.py chooses): float32; bfloat16, packed the same way, inputs cast
to bfloat16 and results back to float32 (the residual stream, norms, attention and KV cache stay float32), for
CPUs with AVX-512 BF16 or AMX; int8, per output channel, multiplied by int8 inputs quantized per row
(Int8Linear), for CPUs with VNNI. A row's int8 product is exact integer arithmetic over that row alone, so it
too never depends on what shares its step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BLOCK_ROWS = 32


class PackedLinear(torch.nn.Module):
    """nn.Linear's computation over a oneDNN-packed float32 or bfloat16 weight, `block_rows` input rows at a time."""

    def __init__(self, linear: torch.nn.Linear, block_rows: int = DEFAULT_BLOCK_ROWS, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.block_rows = linear.in_features, linear.out_features, block_rows
        weight = linear.weight.detach()
        self.dtype = dtype or weight.dtype
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.to(self.dtype), block_rows))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(self.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out], in x's dtype
        if x.dtype != self.dtype:
            return self.forward(x.to(self.dtype)).to(x.dtype)
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


class Int8Linear(torch.nn.Module):
    """nn.Linear with int8 weights (a scale per output channel) times int8 inputs (a scale per row), int32 sums."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # [out, in]
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
        quantized = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized.t().contiguous())  # [in, out]
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features).float()
        if rows.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        row_scale = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)  # [M, 1]
        quantized = (rows / row_scale).round().clamp(-127, 127).to(torch.int8)
        if quantized.shape[0] == 1:  # a lone row alone takes another kernel: pair it, as PackedLinear does
            product = torch._int_mm(quantized.expand(2, -1).contiguous(), self.weight)[:1]
        else:
            product = torch._int_mm(quantized, self.weight)  # [M, out] int32, exact
        out = product.float() * row_scale * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def packing_available(model: torch.nn.Module) -> bool:
    """Whether packing applies: a float32 or bfloat16 model on the CPU, with oneDNN in this torch build."""
    return (
        torch.backends.mkldnn.is_available()
        and next(model.parameters()).device.type == "cpu"
        and next(model.parameters()).dtype in (torch.float32, torch.bfloat16)
    )


@dataclass(frozen=True)
class Packing:
    replaced: int
    """Linear layers now packed."""
    added_bytes: int
    """Memory added: packed copies of weights that another module (a tied embedding) still holds plainly."""


FORMAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Weight formats packed for oneDNN; "int8" is Int8Linear's."""


@torch.no_grad()
def pack_linears(model: torch.nn.Module, block_rows: int = DEFAULT_BLOCK_ROWS, weights: str | None = None) -> Packing:
    """Replace every plain float32 or bfloat16 nn.Linear of `model` by a PackedLinear in the `weights` format
    (float32, bfloat16, or int8 for an Int8Linear; default: the layer's own dtype), in place.

    Quantized linears (bitsandbytes and others subclass nn.Linear) are left alone, and so is a model that is
    not a float32 or bfloat16 one on the CPU. Calling it again replaces nothing more.
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
            if type(child) is torch.nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16):
                if weights == "int8":
                    packed: torch.nn.Module = Int8Linear(child)
                else:
                    packed = PackedLinear(child, block_rows, FORMAT_DTYPES.get(weights or "", child.weight.dtype))
                if child.weight.data_ptr() in held_elsewhere:
                    added += sum(t.numel() * t.element_size() for t in packed.buffers())
                setattr(parent, name, packed)
                replaced += 1
    if replaced:
        own_plain_tensors(model)
    return Packing(replaced, added)


def own_plain_tensors(model: torch.nn.Module) -> None:
    """Copy every parameter and buffer outside the packed layers into memory of its own, so that nothing keeps the
    memory-mapped checkpoint (or any storage shared with the replaced weights) alive."""
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, (PackedLinear, Int8Linear)):
            continue
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None and id(tensor) not in done:
                done.add(id(tensor))
                tensor.data = tensor.data.clone()
