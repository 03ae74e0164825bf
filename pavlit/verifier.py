"""Pure helpers shared by the verifiers (:mod:`pavlit.modules.pav`, :mod:`pavlit.modules.orm`).

Kept as functions and two small torchmetrics metrics rather than a base LightningModule (STYLE.md): the loss,
the learning-rate schedule, scoring at token positions, turning config objects into plain types for checkpoints,
loading a backbone with LoRA / 4-bit, and the exported-verifier folder format.

Exported verifier folder (``save_verifier`` / ``read_export``)::

    <path>/config.json, model.safetensors, tokenizer files   # full fine-tune: a plain Hugging Face folder
    <path>/adapter_config.json, adapter_model.safetensors    # LoRA: only the adapter (+ tokenizer files)
    <path>/value_head.safetensors                            # the scoring head
    <path>/pavlit_verifier.json                              # kind, head, backbone kind, source, lora, quant

A full fine-tune reloads its backbone from the folder itself (``Pretrained(path)``); a LoRA export reloads the
base from the recorded source (a local folder, the seeded tiny model, Gemma 3 270M) and puts the adapter on it.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities import dim_zero_cat

from pavlit.jobs.atomic import atomic_write_text
from pavlit.models.adapters import LoRAArgs, QuantArgs, apply_lora, check_compatible, load_quantized
from pavlit.models.heads import HEAD_TYPES, LikelihoodHead, TokenHead, ValueHead
from pavlit.policy.sources import ModelSource, Pretrained

__all__ = [
    "DefinedAUROC",
    "defined_metrics",
    "EXPORT_FILE",
    "HEAD_FILE",
    "ConstantBaseline",
    "SoftCalibrationError",
    "SourceFromFile",
    "as_group",
    "as_model_source",
    "balance_weights",
    "build_head",
    "load_backbone",
    "masked_bce_with_logits",
    "model_source_classes",
    "read_export",
    "FrozenReference",
    "build_reference",
    "likelihood_features",
    "reference_features",
    "save_verifier",
    "score_positions",
    "source_to_dict",
    "token_logprobs",
    "warmup_cosine",
]

log = logging.getLogger(__name__)

EXPORT_FILE = "pavlit_verifier.json"
HEAD_FILE = "value_head.safetensors"
REFERENCE_FILE = "reference.safetensors"
EXPORT_VERSION = 1
SOURCE_FIELD = "model.init_args.source.init_args.path"


# --- losses and schedules ---------------------------------------------------------------------------------------


def masked_bce_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted mean of binary cross-entropy with **soft** targets over the masked positions.

    ``sum(w · bce(logit, q)) / sum(w)`` over positions where ``mask`` is True; ``bce(l, q) = −q log σ(l) − (1 − q)
    log(1 − σ(l))``, so a target of 0.3 is a soft label, never rounded. Returns 0 (with a gradient path) when no
    position is selected, so an all-masked batch is a no-op rather than a NaN.

    Args:
        logits: ``[...]`` scores.
        targets: ``[...]`` labels in [0, 1] (anything at masked positions).
        mask: ``[...]`` bool, True where a label exists.
        weight: ``[...]`` non-negative per-position weights (class balance); None means 1.
    """
    mask = mask.bool()
    w = mask.to(logits.dtype) if weight is None else weight.to(logits.dtype) * mask
    safe_targets = torch.where(mask, targets.to(logits.dtype), torch.zeros_like(logits))
    losses = F.binary_cross_entropy_with_logits(logits, safe_targets, reduction="none")
    total = w.sum()
    return (losses * w).sum() / total.clamp(min=torch.finfo(logits.dtype).tiny)


def balance_weights(n_low: int, n_high: int) -> tuple[float, float]:
    """Per-label weights that give the two classes (q < 0.5, q ≥ 0.5) equal total weight (docs/method.md §4).

    ``w_c = N / (2 · n_c)``: the weights average to 1 over the data, and each class then carries half of the loss,
    which is what class-balanced sampling gives in expectation. A class that is absent leaves both weights at 1.
    """
    if n_low < 0 or n_high < 0:
        raise ValueError("class counts must be non-negative")
    if n_low == 0 or n_high == 0:
        return 1.0, 1.0
    total = n_low + n_high
    return total / (2 * n_low), total / (2 * n_high)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up from 1/(warmup+1) to 1, then cosine decay to 0 at ``total_steps``.

    (docs/method.md §4: 2k warm-up then cosine over 20k steps.) Past ``total_steps`` it stays at 0.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --- config objects as plain types -------------------------------------------------------------------------------


def source_to_dict(source: ModelSource) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a model source: plain types, as LightningCLI writes them."""
    cls = type(source)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {p: getattr(source, p) for p in params}}


class SourceFromFile(dict):
    """A ``{"class_path", "init_args"}`` model source read from a file (an export's ``pavlit_verifier.json``),
    remembering which file, so that :func:`as_model_source` can name it."""

    def __init__(self, source: Mapping[str, Any], origin: str) -> None:
        super().__init__(source)
        self.origin = origin


def model_source_classes() -> dict[str, type[ModelSource]]:
    """pavlit's own model sources by full and short class path: the only classes a source given as a dict may name."""
    from pavlit.policy import sources

    found: dict[str, type[ModelSource]] = {}
    for value in vars(sources).values():
        if isinstance(value, type) and issubclass(value, ModelSource) and value.__module__ == sources.__name__:
            if not inspect.isabstract(value):
                found[f"{value.__module__}.{value.__qualname__}"] = found[value.__qualname__] = value
    return found


def as_model_source(source: ModelSource | Mapping[str, Any]) -> ModelSource:
    """A model source, or one built from the ``{"class_path", "init_args"}`` dict that :func:`source_to_dict` makes.

    A dict is the serialised form a file carries (an exported verifier's ``pavlit_verifier.json``, a checkpoint's
    ``hyper_parameters``), so it is held to what a file may ask for: its ``class_path`` must be one of pavlit's own
    sources (:func:`model_source_classes`; nothing else is imported), and it may not turn ``trust_remote_code`` on.
    A config or code that wants another source, or remote code, passes a ``ModelSource`` object (LightningCLI
    builds one from a config's ``class_path``).

    Raises:
        ValueError: the dict names another class, asks for remote code, or has arguments the class does not take.
        TypeError: ``source`` is neither a ModelSource nor such a dict.
    """
    if isinstance(source, ModelSource):
        return source
    if isinstance(source, Mapping) and "class_path" in source:
        origin = getattr(source, "origin", None)
        where = f"{origin}: " if origin else ""
        class_path = str(source["class_path"])
        allowed = model_source_classes()
        cls = allowed.get(class_path)
        if cls is None:
            names = ", ".join(sorted(name for name in allowed if "." not in name))
            raise ValueError(
                f"{where}the model source's class_path {class_path!r} is not one of pavlit's model sources "
                f"({names}); a source read from a file may name only these (pass a ModelSource object for another)"
            )
        init_args = dict(source.get("init_args") or {})
        if init_args.get("trust_remote_code"):
            raise ValueError(
                f"{where}the model source asks for trust_remote_code: true ({init_args.get('path')!r}); pavlit never "
                "takes that from a file. If you trust that folder's code, pass the source yourself, e.g. "
                "from_pretrained(folder, source=Pretrained(path, trust_remote_code=True))"
            )
        try:
            return cls(**init_args)
        except TypeError as err:
            raise ValueError(f"{where}the model source {class_path} cannot be built from {init_args}: {err}") from None
    raise TypeError(f"source must be a ModelSource or a {{class_path, init_args}} dict, got {source!r}")


def as_group(value: Any, cls: type) -> Any:
    """A ``LoRAArgs`` / ``QuantArgs`` from an instance, a dict of its fields, or None (the defaults)."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if isinstance(value, Mapping):
        return cls(**dict(value))
    raise TypeError(f"expected {cls.__name__} or a dict of its fields, got {value!r}")


# --- backbone, head and scoring ----------------------------------------------------------------------------------


def load_backbone(source: ModelSource, lora: LoRAArgs, quant: QuantArgs) -> tuple[nn.Module, Any]:
    """Load ``(causal LM, tokenizer)`` from ``source``, quantized and with LoRA as the groups say.

    Quantization needs a local folder (bitsandbytes quantizes while loading): a :class:`Pretrained` source. A
    source that already carries a LoRA adapter (``Pretrained(adapter_path=...)``) has it merged first, so that the
    verifier's own adapters sit on the policy it starts from.

    Raises:
        FileNotFoundError: A ``Pretrained`` path that holds no model; the message names the config field to set.
        ValueError: Contradictory groups (see :func:`pavlit.models.adapters.check_compatible`).
    """
    check_compatible(lora, quant, training=True)
    try:
        if quant.enabled:
            if not isinstance(source, Pretrained):
                raise ValueError(
                    f"quant.mode={quant.mode!r} needs a Pretrained source (a local folder): bitsandbytes quantizes "
                    f"while loading. Save the model with save_pretrained and point {SOURCE_FIELD} at it."
                )
            from transformers import AutoTokenizer

            if not (Path(source.path).expanduser() / "config.json").is_file():
                raise FileNotFoundError(f"no Hugging Face model folder at {source.path!r}")
            tokenizer = AutoTokenizer.from_pretrained(Path(source.path).expanduser(), local_files_only=True)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = load_quantized(Path(source.path).expanduser(), quant)
        else:
            model, tokenizer = source.load()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}\nset {SOURCE_FIELD} to a local checkpoint folder (e.g. a Gemma 2B Hugging Face folder)"
        ) from err
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    # Loaders hand models back in eval mode and Lightning keeps submodules' modes: without this, dropout of a
    # pretrained backbone would stay off during training.
    return apply_lora(model, lora, quant).train(), tokenizer


def build_head(head_type: str, hidden_size: int, tokenizer: Any, score_token: str | None) -> nn.Module:
    """A :class:`ValueHead` (``"linear"``), :class:`LikelihoodHead` (``"likelihood"``) or :class:`TokenHead`
    (``"token"``, ``score_token`` or EOS)."""
    if head_type == "linear":
        return ValueHead(hidden_size)
    if head_type == "likelihood":
        return LikelihoodHead(hidden_size)
    if head_type != "token":
        raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
    token = score_token if score_token is not None else tokenizer.eos_token
    ids = tokenizer.convert_tokens_to_ids([token]) if token is not None else [None]
    if token is None or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"score_token {token!r} is not one token of the tokenizer's vocabulary")
    return TokenHead(int(ids[0]))


def _decoder(backbone: nn.Module) -> nn.Module:
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return base.get_decoder()


def score_positions(
    backbone: nn.Module,
    head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    response_start: torch.Tensor | None = None,
    reference: nn.Module | None = None,
) -> torch.Tensor:
    """One logit per requested token position, from one forward pass of the backbone.

    The decoder (without the LM head) gives the last hidden state; only the ``positions`` rows go through the head,
    so a 262k-vocabulary output layer is never computed (except by a :class:`LikelihoodHead`, which needs every
    token's log-probability).

    Args:
        backbone: A Hugging Face causal LM (optionally a peft model).
        head: A :class:`ValueHead`, :class:`LikelihoodHead` or :class:`TokenHead`.
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        positions: ``[B, K]`` token positions (e.g. ``StepBatch.prefix_positions``).
        response_start: ``[B]`` position of the question's last token (``StepBatch.prompt_end``); the likelihood
            features cover the tokens after it. Default: ``positions[:, 0]`` (the question-only prefix, as in
            ``prefix_positions``).
        reference: The frozen model whose likelihoods a :class:`LikelihoodHead` reads (:class:`FrozenReference`);
            ``None`` reads them from the backbone with its LoRA adapters switched off.

    Returns:
        ``[B, K]`` float32 logits.
    """
    from pavlit.steps import gather_positions

    hidden = _decoder(backbone)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    picked = gather_positions(hidden, positions)
    if isinstance(head, LikelihoodHead):
        start = positions[:, 0] if response_start is None else response_start
        features = reference_features(backbone, reference, input_ids, attention_mask, positions, start)
        return head(picked, features).float()
    output_weight = backbone.get_output_embeddings().weight if isinstance(head, TokenHead) else None
    return head(picked, output_weight).float()


class FrozenReference(nn.Module):
    """A frozen copy of the policy the verifier starts from: the source of a :class:`LikelihoodHead`'s features.

    Fine-tuning the backbone without a language-model loss wrecks its next-token distribution within a hundred
    steps, and features read from it lose their signal (measured on the tiny default: val AUROC 0.63 with features
    from the live backbone vs 0.88 from this copy). The copy never trains and stays in eval mode.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenReference:
        return super().train(False)


def build_reference(backbone: nn.Module, head_type: str) -> FrozenReference | None:
    """The :class:`FrozenReference` a ``"likelihood"`` head needs, or ``None`` (other heads; LoRA backbones, whose
    base model is the reference once the adapters are switched off)."""
    import copy

    from peft import PeftModel

    if head_type != "likelihood" or isinstance(backbone, PeftModel):
        return None
    return FrozenReference(copy.deepcopy(backbone))


@torch.no_grad()
def reference_features(
    backbone: nn.Module,
    reference: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    response_start: torch.Tensor,
) -> torch.Tensor:
    """:func:`likelihood_features` under the reference model (one extra forward pass without gradient)."""
    import contextlib

    if reference is not None:
        model = reference.model if isinstance(reference, FrozenReference) else reference
        if model.training:  # Lightning restores train/eval flags module by module, bypassing train()
            model.eval()
        context: Any = contextlib.nullcontext()
    elif hasattr(backbone, "disable_adapter"):
        model, context = backbone, backbone.disable_adapter()
    else:
        raise ValueError("a 'likelihood' head needs a reference model (build_reference) or a LoRA backbone")
    with context:
        hidden = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return likelihood_features(model, hidden.last_hidden_state, input_ids, positions, response_start)


@torch.no_grad()
def token_logprobs(
    backbone: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, max_values: int = 1 << 25
) -> torch.Tensor:
    """``[B, T]`` log-probability of each token given the ones before it (column 0, which has none, is 0).

    The output projection runs in slices of the sequence so that ``B × slice × vocab`` stays under ``max_values``.
    """
    output = backbone.get_output_embeddings()
    rows, width = input_ids.shape
    result = torch.zeros(rows, width, dtype=torch.float32, device=input_ids.device)
    vocab = output.weight.shape[0]
    step = max(1, max_values // max(1, rows * vocab))
    for begin in range(0, width - 1, step):
        end = min(width - 1, begin + step)
        logits = output(hidden[:, begin:end]).float()
        targets = input_ids[:, begin + 1 : end + 1]
        picked = logits.gather(-1, targets[..., None]).squeeze(-1)
        result[:, begin + 1 : end + 1] = picked - logits.logsumexp(-1)
    return result


def likelihood_features(
    backbone: nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    response_start: torch.Tensor,
) -> torch.Tensor:
    """``[B, K, 4]`` features of the response tokens up to each position (no gradient).

    For the prefix ending at ``positions[:, k]``: the min and the sum of token log-probs over the response tokens
    ``(response_start, positions[:, k]]``, then the same over its last segment ``(positions[:, k-1],
    positions[:, k]]`` (``(response_start, positions[:, 0]]`` for ``k = 0``). Empty ranges (the question-only
    prefix, padded steps) give 0.
    """
    logprobs = token_logprobs(backbone, hidden, input_ids)  # [B, T]
    index = torch.arange(input_ids.shape[1], device=input_ids.device)[None, None, :]
    end = positions[..., None]
    start = response_start.to(positions.device)[:, None, None]
    previous = torch.cat([response_start.to(positions.device)[:, None], positions[:, :-1]], dim=1)[..., None]
    values = logprobs[:, None, :]
    features = []
    for low in (start, torch.maximum(previous, start)):
        inside = (index > low) & (index <= end)
        masked = torch.where(inside, values, torch.zeros_like(values))
        features += [masked.amin(-1), masked.sum(-1)]
    return torch.stack(features, dim=-1)


# --- metrics -----------------------------------------------------------------------------------------------------


class DefinedAUROC(BinaryAUROC):
    """Binary AUROC that is ``None`` when the (synced) targets hold one class only.

    AUROC is undefined then; torchmetrics returns 0 with a warning, which reads as "ranks every pair wrong". A
    verifier trained on labels that are all 0 (a policy that solves nothing) would report exactly that.
    """

    def compute(self) -> torch.Tensor | None:  # type: ignore[override]
        target = dim_zero_cat(self.target) if isinstance(self.target, list) else self.target
        if target.numel() == 0 or bool((target == target.flatten()[0]).all()):
            return None
        return super().compute()


def defined_metrics(values: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """``values`` without the undefined (``None``) ones, as float tensors for ``log_dict``."""
    return {name: value.float() for name, value in values.items() if value is not None}


class SoftCalibrationError(Metric):
    """Expected calibration error against **soft** labels: ``Σ_b (n_b / N) · |mean σ in bin b − mean q in bin b|``.

    torchmetrics' ``BinaryCalibrationError`` compares confidences with 0/1 targets; a Q-model's targets are MC
    fractions, so here each equal-width bin of predictions is compared with the mean MC label that falls in it.

    Args:
        n_bins: Equal-width bins over [0, 1].
    """

    full_state_update = False

    def __init__(self, n_bins: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_bins = n_bins
        for name in ("pred_sum", "target_sum", "count"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = preds.detach().flatten().double(), target.detach().flatten().double()
        bins = (preds * self.n_bins).long().clamp(0, self.n_bins - 1)
        self.pred_sum.index_add_(0, bins, preds)
        self.target_sum.index_add_(0, bins, target)
        self.count.index_add_(0, bins, torch.ones_like(preds))

    def compute(self) -> torch.Tensor:
        total = self.count.sum().clamp(min=1.0)
        return ((self.pred_sum - self.target_sum).abs().sum() / total).float()


class ConstantBaseline(Metric):
    """The best constant predictor of the labels it sees (their mean ``q̄``): its BCE, MSE and accuracy.

    ``BCE = −(q̄ log q̄ + (1 − q̄) log(1 − q̄))`` (mean BCE of the constant ``q̄`` against labels whose mean is
    ``q̄``), ``MSE = mean(q²) − q̄²``, accuracy (for 0/1 labels) ``max(q̄, 1 − q̄)``. Using the evaluation set's own
    mean makes it the strongest constant a verifier has to beat.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("total", "total_sq", "count"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, target: torch.Tensor) -> None:
        target = target.detach().flatten().double()
        self.total += target.sum()
        self.total_sq += (target**2).sum()
        self.count += target.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1.0)
        mean = self.total / n
        eps = 1e-12
        bce = -(mean * torch.log(mean.clamp(min=eps)) + (1 - mean) * torch.log((1 - mean).clamp(min=eps)))
        return {
            "mean": mean.float(),
            "bce": bce.float(),
            "mse": (self.total_sq / n - mean**2).clamp(min=0).float(),
            "accuracy": torch.maximum(mean, 1 - mean).float(),
        }


# --- export ------------------------------------------------------------------------------------------------------


def save_verifier(
    path: str | Path,
    kind: str,
    backbone: nn.Module,
    tokenizer: Any,
    head: nn.Module,
    settings: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None = None,
    reference: nn.Module | None = None,
) -> Path:
    """Write a verifier folder (see the module docstring).

    Args:
        path: Output folder (created).
        kind: ``"pav"`` or ``"orm"``.
        backbone: The causal LM, a peft model when trained with LoRA.
        tokenizer: Saved beside it.
        head: The scoring head.
        settings: Plain-typed constructor settings (``head_type``, ``score_token``, ``source``, ``lora``, ``quant``).
        state_dict: A full state dict of the LightningModule (keys ``backbone.*``, ``value_head.*``) when the live
            parameters are sharded (FSDP); None reads the modules themselves.
        reference: A :class:`FrozenReference`, saved as ``reference.safetensors``.

    Returns:
        The folder.
    """
    from peft import PeftModel
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    backbone_state = head_state = None
    if state_dict is not None:
        backbone_state = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        head_state = {k.removeprefix("value_head."): v for k, v in state_dict.items() if k.startswith("value_head.")}
    if head_state is None:
        head_state = head.state_dict()
    adapter = isinstance(backbone, PeftModel)
    if adapter:
        from peft import get_peft_model_state_dict

        if backbone_state is not None:
            backbone_state = get_peft_model_state_dict(backbone, state_dict=backbone_state)
        backbone.save_pretrained(str(out), safe_serialization=True, state_dict=backbone_state)
    else:
        backbone.save_pretrained(str(out), safe_serialization=True, state_dict=backbone_state)
    tokenizer.save_pretrained(str(out))
    save_file({k: v.detach().contiguous().cpu() for k, v in head_state.items()}, str(out / HEAD_FILE))
    if reference is not None:
        # Cloned: tied input/output embeddings share storage, which safetensors refuses.
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in reference.state_dict().items()}
        save_file(weights, str(out / REFERENCE_FILE))
    dtype = str(next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32))
    meta = {
        "format_version": EXPORT_VERSION,
        "kind": kind,
        "backbone": "adapter" if adapter else "full",
        "dtype": dtype.removeprefix("torch."),
        "reference": reference is not None,
        **dict(settings),
    }
    # Written last and atomically: its presence means the folder is complete (the pipeline's "done" file).
    atomic_write_text(out / EXPORT_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    return out


def read_export(path: str | Path, kind: str) -> dict[str, Any]:
    """The ``pavlit_verifier.json`` of an exported folder, checked to be a ``kind`` verifier."""
    if "://" in str(path):
        raise ValueError(
            f"verifier {str(path)!r} is a URL; an exported verifier is a local folder (nothing is downloaded)"
        )
    folder = Path(path).expanduser()
    meta_path = folder / EXPORT_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {EXPORT_FILE}; export a verifier with save_pretrained(path)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{meta_path}: not UTF-8 text; is it a pavlit export?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}:{err.lineno}: not valid JSON ({err.msg}); is the export truncated?") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("kind") != kind:
        raise ValueError(f"{folder} holds a {meta.get('kind')!r} verifier, not a {kind!r} one")
    if meta.get("format_version") != EXPORT_VERSION:
        raise ValueError(f"{folder}: unsupported verifier format version {meta.get('format_version')!r}")
    return meta


def export_init_args(path: str | Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments that rebuild an exported verifier's architecture (weights are loaded separately)."""
    folder = Path(path).expanduser()
    lora = dict(meta["lora"])
    if meta["backbone"] == "full":
        # The folder itself is the fine-tuned backbone; a full fine-tune never had adapters.
        dtype = meta.get("dtype", "float32")
        source: dict[str, Any] = source_to_dict(
            Pretrained(str(folder), dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32")
        )
        lora["enabled"] = False
    else:
        # What the file says the base model was; as_model_source holds it to what a file may ask for.
        source = SourceFromFile(meta["source"], str(folder / EXPORT_FILE))
    return {
        "source": source,
        "head_type": meta["head_type"],
        "score_token": meta.get("score_token"),
        "lora": lora,
        "quant": dict(meta["quant"]),
    }


def load_export_weights(
    path: str | Path,
    meta: Mapping[str, Any],
    backbone: nn.Module,
    head: nn.Module,
    reference: nn.Module | None = None,
) -> None:
    """Put an exported folder's head weights (and LoRA adapter, for an adapter export; and the frozen reference of
    a ``"likelihood"`` head) into freshly built modules."""
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    if meta.get("reference"):
        if reference is None:
            raise ValueError(f"{folder}: the export has a reference model but the rebuilt verifier has no slot for it")
        reference.load_state_dict(load_file(str(folder / REFERENCE_FILE)))
    if meta["backbone"] == "adapter":
        from peft import set_peft_model_state_dict

        weights = load_file(str(folder / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(backbone, weights)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"{folder}: adapter weights {missing[:3]} do not fit the rebuilt backbone")


# --- Lightning plumbing shared by the two verifier modules (plain functions, no base class) ----------------------


def accelerator_name(trainer: Any) -> str:
    """``"cpu"``, ``"cuda"``, ``"mps"``, ... for ``check_compatible``."""
    return type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()


def configure_adam_warmup_cosine(
    module: nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int
) -> dict[str, Any]:
    """AdamW over the trainable parameters with :func:`warmup_cosine` stepped every optimizer step.

    With ``weight_decay=0`` AdamW is Adam (the paper's optimizer).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(int(total_steps), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def shard_fsdp2(backbone: nn.Module, head: nn.Module, device_mesh: Any) -> None:
    """FSDP2 (``fully_shard``) over the data-parallel mesh: one unit per decoder layer, the decoder, the head.

    Used by ``configure_model`` under ``ModelParallelStrategy`` (CPU-capable, unlike ``strategy: fsdp``). The
    decoder (not the whole causal LM) is the root unit because :func:`score_positions` calls the decoder directly;
    the LM head is never run by the linear head, so it stays outside the shards. The scoring-token head reads the
    LM head's weight directly and is therefore not supported here (use DDP or ``strategy: fsdp``).
    """
    from torch.distributed.fsdp import fully_shard

    if isinstance(head, TokenHead):
        raise ValueError("FSDP2 sharding supports head_type='linear' only; use DDP for the scoring-token head")
    if "tensor_parallel" in (device_mesh.mesh_dim_names or ()) and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError("the verifiers support data-parallel sharding only: set tensor_parallel_size=1")
    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    decoder = _decoder(backbone)
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(decoder, mesh=mesh)
    fully_shard(head, mesh=mesh)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds DTensor (FSDP2-sharded) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module, strategy: Any) -> dict[str, torch.Tensor] | None:
    """A full, CPU state dict of a sharded LightningModule (collective: call on every rank); None when unsharded."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if type(strategy).__name__ == "FSDPStrategy":
        return strategy.lightning_module_state_dict()
    return None


def restore_best_checkpoint(module: Any) -> dict[str, Any] | None:
    """Load the weights of the best checkpoint a monitoring ``ModelCheckpoint`` kept, if there is one.

    Verifiers trained on small label sets overfit; exporting the last step's weights would ship the overfit
    model. With a ``ModelCheckpoint(monitor=...)`` in the trainer's callbacks the export uses its best checkpoint
    instead (read with ``weights_only=True``). Sharded (FSDP) modules keep their final weights.

    Returns:
        ``{"checkpoint", "monitor", "score"}`` of what was restored, or ``None``.
    """
    callback = getattr(module.trainer, "checkpoint_callback", None)
    path = getattr(callback, "best_model_path", "") if getattr(callback, "monitor", None) else ""
    if not path or is_sharded(module):
        return None
    from pavlit.callbacks import load_checkpoint  # weights only, one clear line for a pickled or broken file

    checkpoint = load_checkpoint(path, "the best checkpoint")
    module.load_state_dict(checkpoint["state_dict"])
    score = callback.best_model_score
    return {"checkpoint": str(path), "monitor": callback.monitor, "score": None if score is None else float(score)}


def export_on_train_end(module: Any, kind: str) -> Path | None:
    """Write ``<default_root_dir>/verifier`` (:func:`save_verifier`) and ``<default_root_dir>/metrics.json``.

    ``metrics.json`` holds the last logged metrics (``trainer.callback_metrics``), the DataModule's ``stats`` and,
    when a monitoring checkpoint callback kept a best checkpoint, which one was exported
    (:func:`restore_best_checkpoint`). Every rank must call this (gathering a sharded model is collective);
    rank 0 writes.
    """
    trainer = module.trainer
    best = restore_best_checkpoint(module)
    state = full_state_dict(module, trainer.strategy)
    out = Path(trainer.default_root_dir) / "verifier"
    if trainer.is_global_zero:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        stats = dict(getattr(trainer.datamodule, "stats", {}) or {})
        payload = {"kind": kind, "metrics": metrics, "data": stats, "global_step": trainer.global_step}
        payload["exported"] = best or {"checkpoint": "last step"}
        atomic_write_text(Path(trainer.default_root_dir) / "metrics.json", json.dumps(payload, indent=2) + "\n")
        # The export's pavlit_verifier.json is written last of all: it marks the run as finished.
        module.save_pretrained(out, state_dict=state)
        log.info("exported the %s verifier to %s", kind, out)
    trainer.strategy.barrier()
    return out
