"""The grouped decoder's view of a model: which models it computes, and their layers as fused plain callables.

:func:`supports_fast_decode` says whether :class:`~pavlit.policy.fast_decode.GroupedDecoder` computes exactly a
model's forward; :class:`DecodeWeights` holds, per layer, one fused QKV and one fused gate-up projection (built once
per weight version), the norms, the residual products and, where the layer is what the native step computes
(:mod:`pavlit.policy.native`), the flat weight list that step takes.

Where oneDNN's matrix kernels are the faster ones (:func:`packs_weights`), the projections' weights are prepacked
once into oneDNN's blocked layout and both decoders run them through ``torch.ops.mkldnn._linear_pointwise``.
Elsewhere on CPU they are kept transposed, ``[in, out]`` and contiguous, so the BLAS multiplies ``x @ w`` without
a transposed operand: MKL's fp32 products at the decoder's shapes are 1.1-2.5x faster that way than
``F.linear``'s ``x @ w.T`` (Intel Xeon, 16-64 rows).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pavlit.policy.precision import cpu_flags, cpu_vendor, env_switch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# Output layers narrower than this stay on the BLAS: for the tiny policy's 36 tokens oneDNN is the slower one.
PACK_MIN_OUTPUT = 256
# float32 output layers at least this wide are prepacked on every AVX-512 CPU: at SmolLM2's 49,152 tokens oneDNN's
# product is 1.2-1.8x MKL's on an Intel Xeon too, where MKL wins the layers' products.
PACK_WIDE_OUTPUT = 8192


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_fast_decode(model: nn.Module) -> bool:
    """Whether :class:`GroupedDecoder` computes exactly this model's forward (Llama architecture, no sliding window)."""
    inner = _base_model(model)
    if type(inner).__name__ not in SUPPORTED_ARCHITECTURES:
        return False
    config = inner.config
    if getattr(config, "sliding_window", None) or getattr(config, "pretraining_tp", 1) not in (None, 1):
        return False
    backbone = getattr(inner, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if backbone is None or not all(hasattr(backbone, name) for name in needed):
        return False
    layer = backbone.layers[0]
    return all(hasattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
        hasattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")
    )


def _plain(*modules: nn.Module) -> bool:
    """All plain ``nn.Linear`` of one dtype, with biases on all or none (so they can be concatenated)."""
    if not all(type(m) is nn.Linear for m in modules):
        return False
    return len({m.weight.dtype for m in modules}) == 1 and len({m.bias is None for m in modules}) == 1


@functools.cache
def _onednn_faster(dtype: torch.dtype, wide: bool = False) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        # Where this holds (AVX-512 or Arm bf16 CPUs) torch sends bf16 products to oneDNN anyway; packing skips
        # the per-call weight reorder (1.3-1.6x at SmolLM2's shapes on an AVX512-BF16 EPYC, ~2x with AMX).
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype != torch.float32 or "avx512f" not in cpu_flags():
        return False  # on an AVX2-only EPYC oneDNN's fp32 products were 5-60% slower than MKL's
    # MKL's sgemm takes its AVX2 kernels on AMD CPUs: on an AVX-512 EPYC oneDNN's prepacked fp32 products are
    # 1.7-3x faster at the decoder's shapes (16-128 rows). On an Intel Xeon MKL's own AVX-512 kernels on
    # transposed weights are 1.1-2.5x faster than oneDNN's, except for a wide output layer.
    return wide or cpu_vendor() != "GenuineIntel"


def packs_weights(dtype: torch.dtype, device: torch.device | str = "cpu", out_features: int | None = None) -> bool:
    """Whether the decoder prepacks ``dtype`` projection weights for oneDNN on ``device``: on CPU where oneDNN's
    kernels are the faster ones (float32 on AVX-512 CPUs other than Intel's, and float32 output layers of
    :data:`PACK_WIDE_OUTPUT` or more tokens on any AVX-512 CPU; bf16 where torch runs bf16 products on oneDNN).
    ``out_features`` is given for the output layer, which stays on the BLAS below :data:`PACK_MIN_OUTPUT` tokens.
    ``PAVLIT_ONEDNN=0`` turns it off, ``PAVLIT_ONEDNN=1`` forces it for float32 and bf16."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if out_features is not None and out_features < PACK_MIN_OUTPUT:
        return False
    setting = env_switch("PAVLIT_ONEDNN")
    if setting is None:
        return _onednn_faster(dtype, wide=out_features is not None and out_features >= PACK_WIDE_OUTPUT)
    return setting and torch.backends.mkldnn.is_available()


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
    """``x -> x @ weight^T + bias`` through oneDNN with ``weight`` prepacked once, and the packed weight (an
    opaque MKLDNN tensor)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    linear = torch.ops.mkldnn._linear_pointwise
    return (lambda x: linear(x, packed, bias, "none", [], "")), packed


def _blas_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[Any, torch.Tensor | None]:
    """``x -> x @ weight^T + bias`` through the BLAS, and the weight the native step takes (bias-free only): on
    CPU ``weight^T`` copied once into a contiguous ``[in, out]`` tensor, so the product has no transposed operand."""
    weight = weight.detach()
    if bias is not None:
        return (lambda x: F.linear(x, weight, bias)), None
    if weight.device.type != "cpu":
        return (lambda x: F.linear(x, weight)), None  # the native step is CPU only
    weight_t = weight.t().contiguous()
    return (lambda x: x @ weight_t), weight_t


def _projection(module: nn.Module, pack: bool = False) -> tuple[Any, torch.Tensor | None]:
    """A callable equal to ``module`` that skips ``nn.Module.__call__`` for plain linear layers (prepacked for
    oneDNN with ``pack``), and the weight the native step takes (bias-free plain linears: prepacked, or
    transposed ``[in, out]``), else ``None``."""
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        if pack:
            linear, packed = _packed_linear(weight, None if bias is None else bias.detach())
            return linear, (packed if bias is None else None)
        return _blas_linear(weight, None if bias is None else bias.detach())
    return module, None


def _fused(
    modules: tuple[nn.Module, ...], scales: tuple[float, ...], pack: bool = False
) -> tuple[Any, torch.Tensor | None]:
    """One linear map computing ``cat([scale * m(x) for m in modules], -1)`` and its weight when the modules are
    bias-free (plain linears), or ``(None, None)``; prepacked for oneDNN with ``pack``."""
    if not _plain(*modules):
        return None, None
    weight = torch.cat([m.weight.detach() * s if s != 1.0 else m.weight.detach() for m, s in zip(modules, scales)])
    bias = None
    if modules[0].bias is not None:
        bias = torch.cat([m.bias.detach() * s if s != 1.0 else m.bias.detach() for m, s in zip(modules, scales)])
    if pack:
        linear, weight = _packed_linear(weight, bias)
        return linear, (weight if bias is None else None)
    return _blas_linear(weight, bias)


def _rms_norm_weight(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """A float32 ``LlamaRMSNorm``'s weight and epsilon (what the native step computes), else ``None``."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if type(module).__name__ == "LlamaRMSNorm" and weight is not None and weight.dtype == torch.float32:
        return weight.detach(), float(eps)
    return None


def _residual(module: nn.Module, pack: bool = False) -> tuple[Any, torch.Tensor | None]:
    """``f(residual, x) = residual + module(x)``, in one ``addmm`` for a bias-free plain linear (oneDNN's product
    and an add with ``pack``), and the weight the native step takes (bias-free plain linears), else ``None``."""
    if type(module) is nn.Linear and module.bias is None:
        if pack:
            linear, packed = _packed_linear(module.weight, None)
            return (lambda residual, x: linear(x).add_(residual)), packed
        weight = module.weight.detach()
        weight_t = weight.t().contiguous() if weight.device.type == "cpu" else weight.t()
        return (lambda residual, x: torch.addmm(residual, x, weight_t)), weight_t
    return (lambda residual, x: residual + module(x)), None


def _norm(module: nn.Module) -> Any:
    """The layer's RMSNorm; ``F.rms_norm`` (one kernel, same arithmetic) for float32 ``LlamaRMSNorm``."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if type(module).__name__ == "LlamaRMSNorm" and weight is not None and eps is not None:
        if weight.dtype == torch.float32:
            shape = (weight.shape[0],)
            return lambda x: F.rms_norm(x, shape, weight, eps)
    return module


def _activation(act: nn.Module) -> Any:
    return F.silu if type(act).__name__ in ("SiLU", "SiLUActivation") else act


class _Layer:
    """One decoder layer's callables and shapes."""

    def __init__(self, layer: nn.Module, heads: int, kv_heads: int) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.head_dim = attention.head_dim
        self.heads, self.kv_heads = heads, kv_heads
        self.input_norm = _norm(layer.input_layernorm)
        self.post_norm = _norm(layer.post_attention_layernorm)
        scaling = float(attention.scaling)
        weight = getattr(attention.q_proj, "weight", None)
        dtype = weight.dtype if weight is not None else None
        pack = weight is not None and packs_weights(weight.dtype, weight.device)
        # Folding the scale into W_q is exact for a power of two; in float32 it moves results by an ulp or so.
        exact = math.frexp(scaling)[0] == 0.5
        fold = exact or dtype == torch.float32
        self.qkv, qkv_weight = _fused(
            (attention.q_proj, attention.k_proj, attention.v_proj), (scaling if fold else 1.0, 1.0, 1.0), pack
        )
        self.q_scale = 1.0 if self.qkv is not None and fold else scaling
        if self.qkv is None:
            q, k, v = (_projection(m)[0] for m in (attention.q_proj, attention.k_proj, attention.v_proj))
            self.qkv = lambda x: torch.cat((q(x), k(x), v(x)), dim=-1)
        self.o, o_weight = _residual(attention.o_proj, pack)
        self.gate_up, gate_up_weight = _fused((mlp.gate_proj, mlp.up_proj), (1.0, 1.0), pack)
        if self.gate_up is None:
            gate, up = _projection(mlp.gate_proj)[0], _projection(mlp.up_proj)[0]
            self.gate_up = lambda x: torch.cat((gate(x), up(x)), dim=-1)
        self.intermediate = mlp.gate_proj.out_features
        self.act = _activation(mlp.act_fn)
        self.down, down_weight = _residual(mlp.down_proj, pack)
        # What the native step (pavlit.policy.native) takes, when this layer is what it computes: float32
        # RMSNorms, bias-free plain projections with the attention scale folded into W_q, SiLU.
        norms = (_rms_norm_weight(layer.input_layernorm), _rms_norm_weight(layer.post_attention_layernorm))
        weights = (qkv_weight, o_weight, gate_up_weight, down_weight)
        self.native: tuple[list[torch.Tensor], float] | None = None
        if (
            None not in norms
            and all(w is not None and w.dtype == torch.float32 and w.device.type == "cpu" for w in weights)
            and self.q_scale == 1.0
            and self.act is F.silu
            and norms[0][1] == norms[1][1]
        ):
            self.native = ([norms[0][0], norms[1][0], *weights], norms[0][1])


_UNTRACKED = itertools.count()


def _version(tensor: torch.Tensor) -> int:
    """The in-place update counter; inference tensors have none, so they get a fresh number each time (the fused
    copies are then rebuilt for every batch: safe, if slower)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1 - next(_UNTRACKED)


class DecodeWeights:
    """The decoder's view of a model: fused projections and plain callables, rebuilt when a weight changes.

    Built once per :class:`~pavlit.policy.sampler.Sampler` and reused by every batch; :meth:`current` rebuilds
    the fused copies when any parameter was replaced or updated in place (an RL step), detected through the
    parameters' identities and version counters.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._key: tuple | None = None
        self._build()

    def _fingerprint(self) -> tuple:
        return tuple((id(p), p.data_ptr(), _version(p)) for p in self.model.parameters())

    def _build(self) -> None:
        inner = _base_model(self.model)
        backbone, config = inner.model, inner.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        with torch.no_grad():
            self.layers = [_Layer(layer, heads, kv_heads) for layer in backbone.layers]
        embed = backbone.embed_tokens
        self.embed = (lambda ids: F.embedding(ids, embed.weight)) if type(embed) is nn.Embedding else embed
        self.rotary = backbone.rotary_emb
        self.final_norm = _norm(backbone.norm)
        head = inner.lm_head
        weight = getattr(head, "weight", None)
        pack = weight is not None and packs_weights(weight.dtype, weight.device, out_features=weight.shape[0])
        self.lm_head, head_weight = _projection(head, pack)
        self.heads, self.kv_heads = heads, kv_heads
        # The native step's flat weight list (6 per layer) and epsilon, when every layer qualifies.
        # Then the embedding, final norm and output layer too: [embedding, final norm, output layer] + 6 per layer.
        self.native_weights: list[torch.Tensor] | None = None
        self.native_eps = 0.0
        final = _rms_norm_weight(backbone.norm)
        ends = (embed.weight.detach() if type(embed) is nn.Embedding else None, head_weight)
        epsilons = {layer.native[1] for layer in self.layers if layer.native is not None}
        if (
            all(layer.native is not None for layer in self.layers)
            and final is not None
            and all(w is not None and w.dtype == torch.float32 and w.device.type == "cpu" for w in ends)
            and epsilons == {final[1]}
        ):
            self.native_weights = [ends[0], final[0], ends[1]] + [w for layer in self.layers for w in layer.native[0]]
            self.native_eps = final[1]
        self._key = self._fingerprint()

    def current(self) -> DecodeWeights:
        """Itself, rebuilt first if the model's weights changed since the last build."""
        if self._fingerprint() != self._key:
            self._build()
        return self
