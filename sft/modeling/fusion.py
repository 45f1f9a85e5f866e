"""Fused LoRA wiring: which layers of a PEFT model run the functions of sft.modeling.kernels.

A Llama block feeds its attention input to q, k and v and its MLP input to gate and up. PEFT runs
each of those layers on its own: a base matmul, a dropout of the input, two small adapter matmuls,
a scaling, an addition, each a separate kernel and each keeping its own tensors for the backward
pass. ``fuse`` makes the layers of one group (GROUPS) run as one FusedLoraFunction, the group's
base weights moved into one tensor (each layer's weight a view of it, so nothing is stored twice).
Layers that read an input alone (o, down) are groups of one and get the same dropout and scaling
fusion. More of a Llama block runs as one node each: the SwiGLU activation inside the down
projection, each RMSNorm (whose output a group rebuilds in its backward pass from what the norm
keeps anyway, instead of keeping it), and, on a packed CPU row, the rotary embedding with the
per-example attention (sft.modeling.attention.PackedRotaryAttention). Blocks are recognised by
their forward's bytecode being Llama's (Mistral, Qwen2, ... copy it); their classes are swapped
for subclasses with the fused forward. The adapters, their names and the saved files stay PEFT's.

Decided once, by ``fuse`` when the model is built, and reported (FusionReport): which LoRA layers
are plain ``nn.Linear`` bases in PEFT's layout, which sibling layers form a group (all adapted,
one input width, biases all or none), which MLPs, norms and attentions run Llama's code.

Checked at every call, because a run can change it after the model is built; where a check fails
the call runs PEFT's (or the model's own) forward unchanged:
- the adapters: disabled or merged (``disable_adapter()``, ``merge_adapter()``), several active,
  or an active adapter PEFT runs its own way (DoRA, an unknown dropout): adapters can be added,
  switched, merged and unmerged mid-run;
- the dropout rate: 0 in eval mode, the adapter's in train mode;
- dtypes: ``model.to(dtype)`` or autocast switched on or off between calls;
- the device, and whether a group's weights still lie in one tensor: ``model.to("cuda")`` (the
  Trainer moves the model after the adapters are added) copies each tensor on its own, so the
  group's weights are joined again at its next call; FSDP shards them apart for good;
- whether a group's members are really called with one input (else the group stops fusing);
- for the attention: a packed CPU row, no cache, no attention dropout, one dtype.

The dropout mask is FastDropout's (16 random bits per element, p rounded to a multiple of
2**-16), drawn in the same order, so fused and unfused training draw the same masks.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import Linear as LoraLinear

from sft.modeling.attention import VARLEN_KEYS, PackedRotaryAttention, packed_segments
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
"""Attribute a fused RMSNorm sets on its output: (function, tensors, version) giving the tensor
again from tensors the norm keeps anyway, as long as the tensor's version (its count of in-place
changes) is still ``version``. A group reading that output keeps those instead of its input."""


@dataclass
class Unfused:
    """A module ``fuse`` left to its own forward (PEFT's layer, or the model's own code)."""

    module: str  # its name in the model
    label: str  # what the report counts it as: the layer's name (q_proj) or the module's class
    reason: str


@dataclass
class FusionReport:
    """What ``fuse`` did to a model."""

    layers: int = 0  # adapted layers that run a fused function
    functions: int = 0  # their groups, one fused function each
    joined: int = 0  # groups of several layers (q/k/v, gate/up)
    mlps: int = 0  # SwiGLU MLPs whose activation runs inside the down projection
    norms: int = 0  # RMSNorms run as one function
    attentions: int = 0  # attentions that run rotary embedding and packed attention as one function
    unfused: list[Unfused] = field(default_factory=list)

    def line(self) -> str:
        """One line for the run's output: what fusing did and what it left to other code, with why."""
        line = (f"LoRA fusion: {self.layers} adapted layers run as {self.functions} fused functions "
                f"(q/k/v and gate/up joined)")
        counts: dict[tuple[str, str], int] = {}
        for module in self.unfused:
            counts[module.label, module.reason] = counts.get((module.label, module.reason), 0) + 1
        if counts:
            line += "; left to their own code: " + ", ".join(f"{label} x{n} ({reason})"
                                                            for (label, reason), n in counts.items())
        return line


def fuse(model: torch.nn.Module) -> FusionReport:
    """Make the LoRA layers of ``model`` run fused (GROUPS together, the others alone), and the
    MLPs, RMSNorms and attentions whose code is Llama's run their fused forwards."""
    report = fuse_lora_layers(model)
    report.mlps = fuse_mlps(model)
    report.norms = fuse_rms_norms(model)
    report.attentions = fuse_attention(model)
    report.unfused += _left_to_their_own_code(model)
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    report.unfused.sort(key=lambda module: order[module.module])
    return report


def fuse_lora_layers(model: torch.nn.Module) -> FusionReport:
    """Make PEFT's LoRA Linear layers of ``model`` FusedLinear, in groups; the report says which
    were left to PEFT and why."""
    report = FusionReport()
    names = {module: name for name, module in model.named_modules()}
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        left: dict[str, str] = {name: why for name, child in children.items()
                                if type(child) is LoraLinear and (why := _why_not_fusable(child))}
        taken = set(left)
        for group_names, own_storage in GROUPS.items():
            members = [children.get(name) for name in group_names]
            if any(name in taken or type(m) is not LoraLinear for name, m in zip(group_names, members)):
                continue
            if not _same_input_width(members):
                continue  # each runs alone
            taken.update(group_names)
            if _mixed_biases(members):
                left.update(dict.fromkeys(group_names, "biased and unbiased layers in one group"))
                continue
            _make_group(members, own_storage, report)
        for name, child in children.items():
            if name not in taken and type(child) is LoraLinear:
                _make_group([child], (False,), report)
        report.unfused += [Unfused(names[children[name]], name, f"{why}: PEFT's layer") for name, why in left.items()]
    return report


def _why_not_fusable(layer: LoraLinear) -> str | None:
    if type(layer.base_layer) is not torch.nn.Linear:
        return f"a {type(layer.base_layer).__name__} base"
    if getattr(layer, "fan_in_fan_out", False):
        return "weights laid out transposed"
    return None


def _same_input_width(members: Sequence[LoraLinear]) -> bool:
    weights = [m.base_layer.weight for m in members]
    return all(w.shape[1] == weights[0].shape[1] and w.dtype == weights[0].dtype and w.device == weights[0].device
               for w in weights)


def _mixed_biases(members: Sequence[LoraLinear]) -> bool:
    return len({m.base_layer.bias is None for m in members}) > 1


def _make_group(members: Sequence[LoraLinear], own_storage: tuple[bool, ...], report: FusionReport) -> None:
    if len(members) > 1 and concatenated([m.base_layer.weight for m in members]) is None:
        _join(members)
    group = _Group(members, own_storage)
    for index, member in enumerate(members):
        member.__class__ = FusedLinear
        member.__dict__["_fused_group"] = group
        member.__dict__["_fused_index"] = index
    report.layers += len(members)
    report.functions += 1
    report.joined += len(members) > 1


def concatenated(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The weights as one [sum of rows, d] tensor without a copy, where they lie one after
    another in one storage (as ``fuse`` leaves them); else None."""
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
        arguments = self.arguments(x)
        if arguments is None:
            return None
        outputs = FusedLoraFunction.apply(x, self.own_storage, _rebuild(x), *arguments)
        self.input = weakref.ref(x)
        self.pending = {i: out for i, out in enumerate(outputs) if i != index}
        return outputs[index]

    def arguments(self, x: torch.Tensor) -> tuple | None:
        """The kernels' arguments after ``x``: (weight, bias, p, alphas, sizes, ranks, *A, *B);
        None where a check of the module text's per-call list fails."""
        if not self.enabled:
            return None
        adapters = [_active_adapter(member) for member in self.members]
        if any(adapter is None for adapter in adapters) or len({rate for *_, rate in adapters}) != 1:
            return None
        weight = concatenated([m.base_layer.weight for m in self.members])
        if weight is None:
            weight = _join(self.members)  # a move (model.to("cuda"), as the Trainer does) split them
            if weight is None:
                return None
        a_list, b_list, scalings, rates = zip(*adapters)
        if not torch.is_autocast_enabled(x.device.type) and any(
                t.dtype != x.dtype for t in (weight, *a_list, *b_list)):
            return None
        if x.device != weight.device:
            return None
        biases = [m.base_layer.bias for m in self.members]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        keep_scale = 1.0 / (1.0 - rates[0])  # as FastDropout's
        self.fused_calls += 1
        sizes = tuple(m.base_layer.weight.shape[0] for m in self.members)
        return (weight, bias, rates[0], tuple(scaling * keep_scale for scaling in scalings), sizes,
                tuple(a.shape[0] for a in a_list), *a_list, *b_list)


def _active_adapter(member: LoraLinear) -> tuple[torch.Tensor, torch.Tensor, float, float] | None:
    """(A, B, scaling, dropout rate) of the layer's one active adapter, where it is a plain LoRA
    adapter and enabled; else None."""
    if member.disable_adapters or member.merged or len(member.active_adapters) != 1:
        return None
    name = member.active_adapters[0]
    if name not in member.lora_A or name in getattr(member, "lora_variant", {}):
        return None
    dropout = member.lora_dropout[name]
    if isinstance(dropout, torch.nn.Identity):
        rate = 0.0
    elif isinstance(dropout, (torch.nn.Dropout, FastDropout)):
        rate = dropout.p if dropout.training else 0.0
    else:
        return None
    return member.lora_A[name].weight, member.lora_B[name].weight, member.scaling[name], rate


def _rebuild(x: torch.Tensor) -> Rebuild | None:
    """How to rebuild ``x`` from tensors kept anyway, where it is a fused norm's output unchanged."""
    recipe = getattr(x, REBUILD, None)
    return recipe[:2] if recipe is not None and recipe[2] == x._version else None


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


def _left_to_their_own_code(model: torch.nn.Module) -> list[Unfused]:
    """The attentions, MLPs and norms ``fuse`` did not recognise: the fused path knows Llama's
    code, and other families' blocks (GELU MLPs, Gemma's norms, attention with q/k norms or soft
    caps) run their own forward, exactly but slower."""
    left = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__ == __name__ or isinstance(module, LoraLinear):
            continue
        if hasattr(module, "o_proj") and (hasattr(module, "q_proj") or hasattr(module, "qkv_proj")):
            left.append(Unfused(name, cls.__name__, "not Llama's attention code"))
        elif hasattr(module, "down_proj"):
            left.append(Unfused(name, cls.__name__, "not Llama's SwiGLU MLP with fused projections"))
        elif "Norm" in cls.__name__ and isinstance(getattr(module, "weight", None), torch.Tensor):
            left.append(Unfused(name, cls.__name__, "not Llama's RMSNorm code"))
    return left


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
    arguments = self.down_proj._fused_group.arguments(gate)
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
    segments = packed_segments(boundaries, kwargs.get("packed_parents"))
    output = PackedRotaryAttention.apply(query, key, value, cos, sin, segments, self.scaling)
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
