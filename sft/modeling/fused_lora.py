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

The autograd functions are sft.modeling.kernels'; this module decides which layers run them.

The dropout mask is FastDropout's (16 random bits per element, p rounded to a multiple of
2**-16), drawn in the same order, so fused and unfused training draw the same masks.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence

import torch
from peft.tuners.lora import Linear as LoraLinear

from sft.modeling.attention import VARLEN_KEYS, PackedRotaryAttention, example_lengths
from sft.modeling.devices import release_mapped_pages
from sft.modeling.kernels.lora_linear import FusedLoraFunction, Rebuild, offsets
from sft.modeling.kernels.rms_norm import RMSNormFunction, rms_norm_output
from sft.modeling.kernels.swiglu import SwiGLUDownFunction
from sft.modeling.lora import FastDropout

GROUPS = {("q_proj", "k_proj", "v_proj"): (False, False, True), ("gate_proj", "up_proj"): (False, False)}
"""Sibling layers that read the same input, fused when all of them carry an adapter, with whether
each output gets storage of its own. Outputs are otherwise views of the group's one output
tensor, and a view kept for the backward pass keeps all of it: attention keeps v (not q and k,
which it rotates first), so v is copied out, and the rest of the tensor is freed after rotation."""


REBUILD = "_sft_rebuild"
"""Attribute of a tensor: (function, tensors, version) giving the tensor again from tensors kept
anyway, as long as the tensor's version (its count of in-place changes) is still ``version``."""


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
        outputs = FusedLoraFunction.apply(x, self.own_storage, _rebuild(x), *arguments)
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
                *a_list, *b_list)


def _rebuild(x: torch.Tensor) -> Rebuild | None:
    """How to rebuild ``x`` from tensors kept anyway, where it is a fused norm's output unchanged."""
    recipe = getattr(x, REBUILD, None)
    return recipe[:2] if recipe is not None and recipe[2] == x._version else None


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
    for weight, start in zip(weights, offsets([len(w) for w in weights])):
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


def _fused_rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    output, rstd = RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    if torch.is_grad_enabled():
        # what a fused group reading this output keeps in its place: the norm keeps these anyway
        setattr(output, REBUILD, (rms_norm_output, (hidden_states, rstd, self.weight), output._version))
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
    return SwiGLUDownFunction.apply(gate, up, *arguments)


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
