"""Fused LoRA projections: the adapted layers that read one input run as one autograd node.

A Llama block feeds its attention input to q, k and v and its MLP input to gate and up. PEFT runs
each of those layers on its own: a base matmul, a dropout of the input, two small adapter matmuls,
a scaling, an addition, each a separate kernel and each keeping its own tensors for the backward
pass. Here the layers of one group run as one function:

- one base matmul against the group's weights concatenated (the layers' weights become views of
  that one tensor, so nothing is stored twice);
- one dropout mask for the group, and one matmul with the group's A matrices concatenated;
- each B product added into its slice of the output in the same kernel as its scaling (addmm);
- for the backward pass only the one-byte mask, the rank-r products and what the dropped-out
  input is rebuilt from are kept: tensors another function keeps anyway (the attention output
  the output projection reads; an RMSNorm's input and 1/rms, from which its output is
  recomputed), so no activation is kept twice (PEFT keeps the input, the dropped-out input and
  the scaled outputs); the input gradient is one matmul against the concatenated weights.

Layers that read an input alone (o, down) are groups of one and get the same dropout and scaling
fusion. More functions of a Llama block run as one node each: the SwiGLU activation inside the
down projection (recomputed in the backward pass from gate and up), each RMSNorm, and, on a
packed CPU row, the rotary embedding with the per-example attention (PackedRotaryAttention).
The adapters, their names and the saved files stay PEFT's own; only ``forward`` changes.
Where a condition of the fused path does not hold at a call (adapters disabled or merged, several
adapters active, DoRA, a quantized base layer, mixed dtypes without autocast, or weights that
sharded apart, as FSDP does), the layers run PEFT's forward unchanged. Weights that a move split
(``model.to("cuda")`` copies each tensor on its own, as the Trainer does after the adapters are
added) are joined again at the group's next call.

The dropout mask is FastDropout's (16 random bits per element, p rounded to a multiple of
2**-16), drawn in the same order, so fused and unfused training draw the same masks.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections.abc import Sequence

import torch
from peft.tuners.lora import Linear as LoraLinear

from sft.modeling.attention import VARLEN_KEYS, PackedRotaryAttention, example_lengths
from sft.modeling.devices import release_mapped_pages
from sft.modeling.lora import FastDropout, apply_keep_mask, random_keep_mask

GROUPS = {("q_proj", "k_proj", "v_proj"): (False, False, True), ("gate_proj", "up_proj"): (False, False)}
"""Sibling layers that read the same input, fused when all of them carry an adapter, with whether
each output gets storage of its own. Outputs are otherwise views of the group's one output
tensor, and a view kept for the backward pass keeps all of it: attention keeps v (not q and k,
which it rotates first), so v is copied out, and the rest of the tensor is freed after rotation."""


REBUILD = "_sft_rebuild"
"""Attribute of a tensor: (function, tensors, version) giving the tensor again from tensors kept
anyway, as long as the tensor's version (its count of in-place changes) is still ``version``."""


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where autocast is on, else the base weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _lora_forward(flat: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, p: float, alphas: Sequence[float],
                  sizes: Sequence[int], ranks: Sequence[int], a_cat: torch.Tensor, b_list: Sequence[torch.Tensor],
                  scratch: bool = False):
    """The group's output [rows, sum of sizes] for flat [rows, d], all in one dtype; with the
    dropout mask (None without dropout) and the rank-r products. ``scratch``: flat is the
    caller's own and may be overwritten (by its dropped-out copy, after the base matmul read it)."""
    out = flat @ w.T if bias is None else torch.addmm(bias, flat, w.T)
    keep = random_keep_mask(flat.shape, p, flat.device) if p > 0.0 else None
    dropped = flat if keep is None else apply_keep_mask(flat, keep, out=flat if scratch else None)
    low = dropped @ a_cat.T
    for col, row, size, rank, b, alpha in zip(_offsets(sizes), _offsets(ranks), sizes, ranks, b_list, alphas):
        out[:, col:col + size].addmm_(low[:, row:row + rank], b.T, alpha=alpha)
    return out, keep, low


def _lora_backward(grad_out: torch.Tensor, w: torch.Tensor, a_cat: torch.Tensor, b_list: Sequence[torch.Tensor],
                   dropped: torch.Tensor, keep: torch.Tensor | None, low: torch.Tensor, alphas: Sequence[float],
                   sizes: Sequence[int], ranks: Sequence[int], input_grad: bool, own_dropped: bool = False):
    """Gradients of _lora_forward's output: for flat (None unless ``input_grad``), each A, each B.
    ``own_dropped``: ``dropped`` is the caller's own, free once read, and takes flat's gradient
    (writing into memory just used is faster than into a new tensor)."""
    grad_low, grad_b = [], []
    for col, row, size, rank, b, alpha in zip(_offsets(sizes), _offsets(ranks), sizes, ranks, b_list, alphas):
        g = grad_out[:, col:col + size]
        grad_low.append((g @ b).mul_(alpha))
        # as [rank, size] and transposed: g read row by row, not down its columns (docs/performance.md)
        grad_b.append((low[:, row:row + rank].T @ g).mul_(alpha).T)
    grad_low = torch.cat(grad_low, dim=1)
    grad_a = list((grad_low.T @ dropped).split(list(ranks)))
    grad_flat = None
    if input_grad:
        # the adapters' part first, masked in place; the base matmul then adds itself into it
        # inside the matmul kernel (beta 1), where adding it afterwards would be one more pass
        grad_flat = torch.mm(grad_low, a_cat, out=dropped) if own_dropped else grad_low @ a_cat
        if keep is not None:
            apply_keep_mask(grad_flat, keep, out=grad_flat)
        grad_flat.addmm_(grad_out, w)
    return grad_flat, grad_a, grad_b


class _FusedLoraFunction(torch.autograd.Function):
    """outputs_i = x @ W_i.T + bias_i + alpha_i * (dropout(x) @ A_i.T) @ B_i.T for a group of layers.

    ``weight`` is the group's base weights concatenated ([sum of outputs, d]), ``alphas`` the LoRA
    scalings (times 1 / (1 - p) with dropout), ``sizes`` the layers' output widths."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: float,  # type: ignore[override]
                alphas: tuple[float, ...], sizes: tuple[int, ...], ranks: tuple[int, ...],
                own_storage: tuple[bool, ...], *adapters: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(sizes)
        dtype = _compute_dtype(x, weight)
        ctx.input_dtype, ctx.input_shape = x.dtype, x.shape
        w, a_cat = weight.to(dtype), torch.cat([a.to(dtype) for a in adapters[:count]])
        b_list = [b.to(dtype) for b in adapters[count:]]
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out, keep, low = _lora_forward(flat, w, None if bias is None else bias.to(dtype),
                                           p, alphas, sizes, ranks, a_cat, b_list)
        # Keep the input, not its dropped-out copy (rebuilt in the backward pass), and where it is
        # an RMSNorm's output still as the norm left it, what the norm keeps anyway instead: the
        # attention output the output projection reads is kept by attention too, so neither costs
        # memory of its own. (A copy converted under autocast is the one tensor kept of its size.)
        recipe = getattr(x, REBUILD, None)
        as_is = flat.dtype == x.dtype and flat.data_ptr() == x.data_ptr()
        if recipe is not None and recipe[2] == x._version and as_is:
            ctx.rebuild, kept = recipe[:2]
        else:
            ctx.rebuild, kept = None, (flat,)
        ctx.save_for_backward(w, a_cat, *b_list, keep, low, *kept)
        ctx.meta = (alphas, sizes, ranks)
        ctx.adapter_dtypes = [t.dtype for t in adapters]
        lead = x.shape[:-1]
        return tuple(out[:, start:start + size].clone().view(*lead, size) if own else
                     out[:, start:start + size].view(*lead, size)
                     for start, size, own in zip(_offsets(sizes), sizes, own_storage))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        alphas, sizes, ranks = ctx.meta
        count = len(sizes)
        w, a_cat, *rest = ctx.saved_tensors
        b_list, (keep, low, *kept) = rest[:count], rest[count:]
        rebuilt = ctx.rebuild is not None
        flat = ctx.rebuild(*kept).reshape(-1, w.shape[1]) if rebuilt else kept[0]
        # a rebuilt input is this pass's own: its dropped-out copy overwrites it
        keep = None if keep is None else keep.to(w.dtype)  # converted once for both of its uses
        dropped = flat if keep is None else apply_keep_mask(flat, keep, out=flat if rebuilt else None)
        rows, lead = dropped.shape[0], ctx.input_shape[:-1]
        grad_out = _side_by_side(grads, rows, w.dtype)
        if grad_out is None:
            # cat reads strided gradients as they are (a reshape first would copy each of them)
            grad_out = torch.cat([torch.zeros(*lead, size, dtype=w.dtype, device=w.device) if g is None
                                  else g.to(w.dtype) for g, size in zip(grads, sizes)], dim=-1).view(rows, -1)
        grad_x, grad_a, grad_b = _lora_backward(grad_out, w, a_cat, b_list, dropped, keep, low, alphas, sizes, ranks,
                                                ctx.needs_input_grad[0], own_dropped=rebuilt or keep is not None)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.input_shape).to(ctx.input_dtype)
        adapter_grads = [g.to(d) for g, d in zip((*grad_a, *grad_b), ctx.adapter_dtypes)]
        return (grad_x, None, None, None, None, None, None, None, *adapter_grads)


class _SwiGLUDownFunction(torch.autograd.Function):
    """down(silu(gate) * up) for a fused down projection (a group of one), keeping only gate, up
    (which the gate/up group's output holds anyway), the dropout mask and the rank-r product:
    the activation, the product and its dropped-out copy are recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                p: float, alphas: tuple[float, ...], sizes: tuple[int, ...], ranks: tuple[int, ...],
                own_storage: tuple[bool, ...], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(gate, weight)
        ctx.input_dtypes = (gate.dtype, up.dtype)
        w, a_cast, b_cast = weight.to(dtype), a.to(dtype), b.to(dtype)
        with torch.autocast(gate.device.type, enabled=False):
            hidden = torch.nn.functional.silu(gate.to(dtype)).mul_(up.to(dtype)).view(-1, gate.shape[-1])
            out, keep, low = _lora_forward(hidden, w, None if bias is None else bias.to(dtype), p, alphas, sizes,
                                           ranks, a_cast, [b_cast], scratch=True)
        ctx.save_for_backward(gate, up, w, a_cast, b_cast, keep, low)
        ctx.meta = (alphas, sizes, ranks, dtype)
        ctx.adapter_dtypes = (a.dtype, b.dtype)
        return out.view(*gate.shape[:-1], sizes[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gate, up, w, a_cat, b, keep, low = ctx.saved_tensors
        alphas, sizes, ranks, dtype = ctx.meta
        shape = gate.shape
        gate, up = (t.to(dtype).view(-1, t.shape[-1]) for t in (gate, up))
        # gate's and up's gradients side by side in one tensor, as the gate/up group's output lies,
        # so that its backward reads them without concatenating; up's is the activation times the
        # product's gradient, computed in place where the activation lies
        width = gate.shape[-1]
        joined = gate.new_empty(gate.shape[0], 2 * width)
        activation = torch.ops.aten.silu.out(gate, out=joined[:, width:])
        hidden = activation * up
        keep = None if keep is None else keep.to(dtype)  # converted once for both of its uses
        dropped = hidden if keep is None else apply_keep_mask(hidden, keep, out=hidden)
        grad_hidden, grad_a, grad_b = _lora_backward(grad.reshape(-1, sizes[0]).to(dtype), w, a_cat, [b], dropped,
                                                     keep, low, alphas, sizes, ranks, True, own_dropped=True)
        grad_up = activation.mul_(grad_hidden)
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_hidden.mul_(up), gate, grad_input=joined[:, :width])
        return (grad_gate.view(shape).to(ctx.input_dtypes[0]), grad_up.view(shape).to(ctx.input_dtypes[1]),
                None, None, None, None, None, None, None,
                grad_a[0].to(ctx.adapter_dtypes[0]), grad_b[0].to(ctx.adapter_dtypes[1]))


def _side_by_side(grads: Sequence[torch.Tensor | None], rows: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The gradients as one [rows, sum of widths] tensor without a copy, where they are column
    blocks of one such tensor, in order (as _SwiGLUDownFunction returns them); else None."""
    if any(g is None or g.dtype != dtype for g in grads):
        return None
    total = sum(g.shape[-1] for g in grads)
    expected = grads[0].data_ptr()
    for g in grads:
        try:
            flat = g.view(rows, g.shape[-1])
        except RuntimeError:  # strides that no [rows, width] view has
            return None
        if (flat.stride(1) != 1 or (rows > 1 and flat.stride(0) != total) or flat.data_ptr() != expected
                or g.untyped_storage().data_ptr() != grads[0].untyped_storage().data_ptr()):
            return None
        expected += g.shape[-1] * g.element_size()
    return grads[0].as_strided((rows, total), (total, 1))


def _offsets(sizes: Sequence[int]) -> list[int]:
    """Where each of ``sizes`` starts when they are laid one after another."""
    return list(itertools.accumulate(sizes[:-1], initial=0))


class _Group:
    """The layers of one group, and the outputs computed for members not called yet."""

    def __init__(self, members: Sequence[LoraLinear], own_storage: tuple[bool, ...]) -> None:
        self.members = list(members)
        self.own_storage = own_storage
        self.enabled = True
        self._reset()

    def _reset(self) -> None:
        self.input: weakref.ReferenceType | None = None
        self.pending: dict[int, torch.Tensor] = {}
        self.unused = 0
        self.fused_calls = 0

    def __getstate__(self) -> dict:  # copies and pickles carry no half-consumed outputs
        return {"members": self.members, "own_storage": self.own_storage, "enabled": self.enabled}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """The output of member ``index`` for ``x`` if the group computed it already."""
        if self.input is not None and self.input() is x and index in self.pending:
            return self.pending.pop(index)
        return None

    def run(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Compute every member's output for ``x``; return member ``index``'s, keep the others
        for their calls. None where the fused path does not apply (the caller runs PEFT's)."""
        if self.pending:
            # Outputs computed for members that were never called with that input: this model
            # does not call the group together, and fusing would waste work. Stop fusing it.
            self.unused += 1
            self.pending = {}
            if self.unused > 1:
                self.enabled = False
        arguments = self._arguments(x)
        if arguments is None:
            return None
        outputs = _FusedLoraFunction.apply(x, *arguments)
        self.input = weakref.ref(x)
        self.pending = {i: out for i, out in enumerate(outputs) if i != index}
        return outputs[index]

    def _arguments(self, x: torch.Tensor) -> tuple | None:
        if not self.enabled:
            return None
        p = None
        a_list, b_list, alphas, ranks = [], [], [], []
        for member in self.members:
            if member.disable_adapters or member.merged or len(member.active_adapters) != 1:
                return None
            name = member.active_adapters[0]
            if name not in member.lora_A or name in getattr(member, "lora_variant", {}):
                return None
            if type(member.base_layer) is not torch.nn.Linear:
                return None
            dropout = member.lora_dropout[name]
            if isinstance(dropout, torch.nn.Identity):
                rate = 0.0
            elif isinstance(dropout, (torch.nn.Dropout, FastDropout)):
                rate = dropout.p if dropout.training else 0.0
            else:
                return None
            if p is not None and rate != p:
                return None
            p = rate
            a, b = member.lora_A[name].weight, member.lora_B[name].weight
            a_list.append(a)
            b_list.append(b)
            ranks.append(a.shape[0])
            alphas.append(member.scaling[name])
        weight = concatenated([m.base_layer.weight for m in self.members])
        if weight is None:
            weight = _join(self.members)  # a move (model.to("cuda"), as the Trainer does) split them
            if weight is None:
                return None
        biases = [m.base_layer.bias for m in self.members]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return None
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and any(t.dtype != x.dtype for t in (weight, *a_list, *b_list)):
            return None
        if x.device != weight.device:
            return None
        keep_scale = 1.0 / (1.0 - p)  # as FastDropout's
        self.fused_calls += 1
        sizes = tuple(m.base_layer.weight.shape[0] for m in self.members)
        return (weight, bias, p, tuple(alpha * keep_scale for alpha in alphas), sizes, tuple(ranks),
                self.own_storage, *a_list, *b_list)


def concatenated(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The weights as one [sum of rows, d] tensor without a copy, where they lie one after
    another in one storage (as fuse_lora_projections leaves them); else None."""
    if any(type(w) not in (torch.Tensor, torch.nn.Parameter) for w in weights):
        return None  # a tensor subclass (FSDP's DTensor, a quantized weight) has no plain storage
    first = weights[0]
    columns = first.shape[1]
    storage = first.untyped_storage().data_ptr()
    expected = first.data_ptr()
    rows = 0
    for w in weights:
        if (w.dim() != 2 or w.shape[1] != columns or not w.is_contiguous() or w.dtype != first.dtype
                or w.device != first.device or w.data_ptr() != expected
                or w.untyped_storage().data_ptr() != storage):
            return None
        expected += w.numel() * w.element_size()
        rows += w.shape[0]
    return torch.as_strided(first.detach(), (rows, columns), (columns, 1))


class FusedLinear(LoraLinear):
    """PEFT's LoRA Linear whose forward runs its group's fused function (see the module text)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        group: _Group | None = self.__dict__.get("_fused_group")
        if group is None or args or kwargs:
            return super().forward(x, *args, **kwargs)
        index = self.__dict__["_fused_index"]
        output = group.take(index, x)
        if output is None:
            output = group.run(index, x)
        return output if output is not None else super().forward(x)


def fused_group_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(groups of several layers that ran their fused function at least once, all such groups)."""
    groups = {id(group): group for module in model.modules() if isinstance(module, FusedLinear)
              and (group := module.__dict__.get("_fused_group")) is not None and len(group.members) > 1}
    return sum(group.fused_calls > 0 for group in groups.values()), len(groups)


def fusion_report(model: torch.nn.Module) -> str:
    """One line on what fusing did to ``model`` and what it left to PEFT's layers or the model's own
    code, with why: the fused path recognises Llama's code, and other families' blocks (GELU MLPs,
    Gemma's norms, attention with q/k norms or soft caps) run their own forward, exactly but slower."""
    groups = {id(g): g for m in model.modules() if isinstance(m, FusedLinear) and (g := m.__dict__["_fused_group"])}
    layers = sum(len(g.members) for g in groups.values())
    left: dict[str, int] = {}
    for name, module in model.named_modules():
        cls = type(module)
        if cls is LoraLinear:
            reason = ("weights laid out transposed" if getattr(module, "fan_in_fan_out", False)
                      else f"a {type(module.base_layer).__name__} base")
            key = f"{name.rsplit('.', 1)[-1]} ({reason}: PEFT's layer)"
        elif cls.__module__ == __name__:
            continue
        elif hasattr(module, "o_proj") and (hasattr(module, "q_proj") or hasattr(module, "qkv_proj")):
            key = f"{cls.__name__} (not Llama's attention code)"
        elif hasattr(module, "down_proj"):
            key = f"{cls.__name__} (not Llama's SwiGLU MLP with fused projections)"
        elif "Norm" in cls.__name__ and isinstance(getattr(module, "weight", None), torch.Tensor):
            key = f"{cls.__name__} (not Llama's RMSNorm code)"
        else:
            continue
        left[key] = left.get(key, 0) + 1
    line = f"LoRA fusion: {layers} adapted layers run as {len(groups)} fused functions (q/k/v and gate/up joined)"
    if left:
        line += "; left to their own code: " + ", ".join(f"{key.replace(' (', f' x{n} (', 1)}"
                                                        for key, n in left.items())
    return line


def fuse_lora_projections(model: torch.nn.Module) -> int:
    """Make the LoRA layers of ``model`` run fused (GROUPS together, the others alone); returns
    the number of groups of more than one layer. The base weights of a group are moved into one
    tensor, each layer's weight a view of it."""
    fused = 0
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        taken: set[str] = set()
        for names, own_storage in GROUPS.items():
            members = [children.get(name) for name in names]
            if all(type(m) is LoraLinear and _fusable(m) for m in members) and _same_input_width(members):
                _make_group(members, own_storage)
                taken.update(names)
                fused += 1
        for name, child in children.items():
            if name not in taken and type(child) is LoraLinear and _fusable(child):
                _make_group([child], (False,))
    fuse_mlps(model)
    fuse_rms_norms(model)
    fuse_attention(model)
    return fused


def _fusable(layer: LoraLinear) -> bool:
    return type(layer.base_layer) is torch.nn.Linear and not getattr(layer, "fan_in_fan_out", False)


def _same_input_width(members: Sequence[LoraLinear]) -> bool:
    weights = [m.base_layer.weight for m in members]
    return all(w.shape[1] == weights[0].shape[1] and w.dtype == weights[0].dtype and w.device == weights[0].device
               for w in weights)


def _join(members: Sequence[LoraLinear]) -> torch.Tensor | None:
    """Move the frozen base weights of ``members`` into one tensor, each weight (the same
    Parameter) becoming a view of it; returns that tensor, or None where they cannot be joined:
    a tensor subclass (FSDP's DTensor, a quantized weight), a weight that trains, or weights of
    different widths, dtypes or devices, and not under ``torch.inference_mode``."""
    weights = [m.base_layer.weight for m in members]
    if torch.is_inference_mode_enabled():  # an inference tensor could not be used for training after
        return None
    if (any(type(w) not in (torch.Tensor, torch.nn.Parameter) or w.requires_grad or w.dim() != 2 for w in weights)
            or not _same_input_width(members)):
        return None
    joined = torch.cat([w.detach() for w in weights])
    old = [w.data for w in weights]
    for weight, start in zip(weights, _offsets([len(w) for w in weights])):
        weight.data = joined[start:start + len(weight)]
    # Weights read from a mapped checkpoint would stay resident beside their copy.
    release_mapped_pages(old)
    return concatenated(weights)


def _make_group(members: Sequence[LoraLinear], own_storage: tuple[bool, ...]) -> None:
    if len(members) > 1 and concatenated([m.base_layer.weight for m in members]) is None:
        _join(members)
    group = _Group(members, own_storage)
    for index, member in enumerate(members):
        member.__class__ = FusedLinear
        member.__dict__["_fused_group"] = group
        member.__dict__["_fused_index"] = index


class _RMSNormFunction(torch.autograd.Function):
    """Llama's RMSNorm, weight * (x / rms(x)) computed in float32 and cast back to x's dtype before
    the weight, as transformers computes it; keeps x and the reciprocal rms, as autograd does, but
    its backward is three passes over x instead of autograd's eight (timed in docs/performance.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, rstd, weight)
        ctx.mark_non_differentiable(rstd)
        return _rms_norm_output(x, rstd, weight), rstd

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor | None):  # type: ignore[override]
        x, rstd, weight = ctx.saved_tensors
        x32 = x.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normalized = (x32 * rstd).to(x.dtype)
            grad_weight = (grad * normalized).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normalized = (grad * weight).float()
        # d/dx of x * rstd: rstd * g - x * rstd^3 * mean(g * x)
        coefficient = torch.linalg.vecdot(grad_normalized, x32).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
        grad_x = grad_normalized.mul_(rstd).addcmul_(x32, coefficient, value=-1.0)
        return grad_x.to(x.dtype), grad_weight, None


def _rms_norm_output(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    normalized = (x.float() * rstd).to(x.dtype)  # a new tensor: the weight multiplies it in place
    return normalized.mul_(weight) if weight.dtype == normalized.dtype else weight * normalized


def _fused_rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    output, rstd = _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    if torch.is_grad_enabled():
        # what a fused group reading this output keeps in its place: the norm keeps these anyway
        setattr(output, REBUILD, (_rms_norm_output, (hidden_states, rstd, self.weight), output._version))
    return output


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Give the RMSNorms whose forward is Llama's (Llama, Mistral, Qwen2, ... copy it) the one-function
    forward above; returns how many."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    count = 0
    for module in model.modules():
        if _same_code(type(module).forward, LlamaRMSNorm.forward) and isinstance(
                getattr(module, "weight", None), torch.Tensor):
            _swap_class(module, _fused_rms_norm_forward, "Fused")
            count += 1
    return count


def _fused_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama MLP's forward, down(silu(gate(x)) * up(x)), with gate/up fused (fuse_mlps checked
    the groups) and the activation inside the fused down projection where it can run."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    arguments = self.down_proj._fused_group._arguments(gate)
    if arguments is None:
        return self.down_proj(self.act_fn(gate) * up)
    return _SwiGLUDownFunction.apply(gate, up, *arguments)


def _same_code(function: object, reference: object) -> bool:
    code, expected = getattr(function, "__code__", None), getattr(reference, "__code__", None)
    return (code is not None and expected is not None and code.co_code == expected.co_code
            and code.co_names == expected.co_names and code.co_consts == expected.co_consts)


_FUSED_CLASSES: dict[type, type] = {}


def _swap_class(module: torch.nn.Module, forward: object, prefix: str) -> None:
    cls = type(module)
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"{prefix}{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    module.__class__ = _FUSED_CLASSES[cls]


def fuse_mlps(model: torch.nn.Module) -> int:
    """Give the MLPs whose forward is Llama's SwiGLU (Llama, Mistral, Qwen2, ... copy it) and whose
    projections are fused the fused forward above; returns how many."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    count = 0
    for module in model.modules():
        if not (_same_code(type(module).forward, LlamaMLP.forward)
                and isinstance(module.act_fn, (SiLUActivation, torch.nn.SiLU))):
            continue
        layers = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(layer) is FusedLinear for layer in layers):
            continue
        pair, up_pair, down = (layer._fused_group for layer in layers)
        if pair is up_pair and len(pair.members) == 2 and len(down.members) == 1:
            _swap_class(module, _fused_mlp_forward, "Fused")
            count += 1
    return count


def _fused_attention_forward(self: torch.nn.Module, hidden_states: torch.Tensor,
                             position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                             attention_mask: torch.Tensor | None = None, past_key_values: object = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """A Llama attention's forward (fuse_attention checked it is one) where its rotary embedding
    and packed attention run as one function (PackedRotaryAttention): a packed row on the CPU,
    no cache, no attention dropout, one dtype throughout. Anything else runs the model's own."""
    boundaries = kwargs.get("packed_boundaries")
    cos, sin = position_embeddings if position_embeddings is not None else (None, None)
    if (boundaries is None or past_key_values is not None or cos is None or hidden_states.shape[0] != 1
            or hidden_states.device.type != "cpu" or self.config._attn_implementation not in VARLEN_KEYS
            or (self.training and self.attention_dropout > 0) or torch.is_autocast_enabled("cpu")
            or cos.requires_grad or sin.requires_grad or not hidden_states.dtype == cos.dtype == sin.dtype):
        return super(type(self), self).forward(hidden_states, position_embeddings, attention_mask,
                                               past_key_values, **kwargs)
    query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    output = PackedRotaryAttention.apply(query, key, value, cos, sin, example_lengths(boundaries), self.scaling)
    return self.o_proj(output), None


def fuse_attention(model: torch.nn.Module) -> int:
    """Give the attention modules whose forward and rotary embedding are Llama's (Llama and the
    models that copy both) the forward above; returns how many."""
    from transformers.models.llama import modeling_llama

    count = 0
    for module in model.modules():
        cls = type(module)
        rotate = getattr(sys.modules.get(cls.__module__), "apply_rotary_pos_emb", None)
        if (_same_code(cls.forward, modeling_llama.LlamaAttention.forward)
                and _same_code(rotate, modeling_llama.apply_rotary_pos_emb)
                and isinstance(getattr(module, "head_dim", None), int)):
            _swap_class(module, _fused_attention_forward, "Fused")
            count += 1
    return count
