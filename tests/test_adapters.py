"""LoRA / quantization option groups and their mapping to peft and bitsandbytes (pavlit.models.adapters)."""

import logging
import sys
import warnings

import pytest
import torch
from torch import nn

from pavlit.models.adapters import (
    LoRAArgs,
    QuantArgs,
    apply_lora,
    check_compatible,
    count_parameters,
    cpu_4bit_kernels,
    from_pretrained_kwargs,
    load_adapter,
    load_quantized,
    quantization_config,
    quantized_bits,
    save_adapter,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 64, 128, 2, 100
# all-linear on a Llama block: q, k, v, o (64 -> 64), gate, up (64 -> 128), down (128 -> 64); each adapter
# holds r * (in + out) values.
LORA_VALUES_PER_RANK = LAYERS * (4 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + INTERMEDIATE) + (INTERMEDIATE + HIDDEN))


def tiny_llama(seed: int = 0) -> "transformers.LlamaForCausalLM":
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


class Verifier(nn.Module):
    """A backbone plus a scalar head, the shape of a PAV / ORM model."""

    def __init__(self, backbone: nn.Module, head_name: str = "value_head") -> None:
        super().__init__()
        self.backbone = backbone
        self.head_name = head_name
        torch.manual_seed(1)
        setattr(self, head_name, nn.Linear(HIDDEN, 1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
        return getattr(self, self.head_name)(hidden).squeeze(-1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes")


def tokens(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


def sgd_step(model: nn.Module, loss: torch.Tensor, lr: float = 0.5) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- option groups -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "LoRAArgs.r"),
        ({"r": -4}, "LoRAArgs.r"),
        ({"alpha": 0}, "LoRAArgs.alpha"),
        ({"dropout": 1.0}, "LoRAArgs.dropout"),
        ({"dropout": -0.1}, "LoRAArgs.dropout"),
        ({"bias": "some"}, "LoRAArgs.bias"),
        ({"target_modules": []}, "LoRAArgs.target_modules"),
        ({"target_modules": ""}, "LoRAArgs.target_modules"),
    ],
)
def test_lora_args_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        LoRAArgs(**kwargs)


def test_lora_args_accept_edges_and_keep_lists():
    args = LoRAArgs(r=1, dropout=0.0, bias="lora_only", target_modules=("q_proj", "v_proj"))
    assert args.target_modules == ["q_proj", "v_proj"]
    assert LoRAArgs().target_modules == "all-linear"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "int4"}, "QuantArgs.mode"),
        ({"compute_dtype": "float64"}, "QuantArgs.compute_dtype"),
        ({"double_quant": "yes"}, "QuantArgs.double_quant"),
    ],
)
def test_quant_args_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        QuantArgs(**kwargs)


@pytest.mark.parametrize(("mode", "bits"), [("none", None), ("nf4", 4), ("fp4", 4), ("int8", 8)])
def test_quant_args_bits(mode, bits):
    assert QuantArgs(mode=mode).bits == bits
    assert QuantArgs(mode=mode).enabled == (bits is not None)


def test_groups_parse_from_the_command_line():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--lora", type=LoRAArgs, default=LoRAArgs())
    parser.add_argument("--quant", type=QuantArgs, default=QuantArgs())
    cfg = parser.instantiate(parser.parse_args(["--lora.enabled=true", "--lora.target_modules=[q_proj]"]))
    assert cfg.lora == LoRAArgs(enabled=True, target_modules=["q_proj"])
    assert cfg.quant == QuantArgs()
    with pytest.raises(ValueError, match=r"LoRAArgs\.r"):
        parser.instantiate(parser.parse_args(["--lora.r=0"]))


# --- contradictions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lora", "mode", "compute", "precision", "training", "accelerator", "error"),
    [
        # full fine-tuning of quantized weights
        (False, "nf4", "bfloat16", None, True, None, "lora.enabled=False"),
        (False, "int8", "bfloat16", "32-true", True, "cpu", "lora.enabled=False"),
        (False, "nf4", "bfloat16", "bf16-mixed", False, "cpu", None),  # inference is fine
        (True, "nf4", "bfloat16", "bf16-mixed", True, "cpu", None),
        (True, "nf4", "float32", "32-true", True, "cpu", None),
        (True, "nf4", "float32", "16-mixed", True, "gpu", None),
        (True, "int8", "bfloat16", "bf16-true", True, "cpu", None),
        # precisions the bitsandbytes layers cannot honour
        (True, "nf4", "bfloat16", "64-true", True, None, "precision='64-true'"),
        (True, "int8", "bfloat16", 64, True, None, "precision=64"),
        (True, "fp4", "bfloat16", "transformer-engine", True, "gpu", "transformer-engine"),
        # fp16 AMP on CPU
        (True, "nf4", "float32", "16-mixed", True, "cpu", "on CPU"),
        (True, "int8", "bfloat16", "16", True, "cpu", "on CPU"),
        (True, "int8", "bfloat16", "16-mixed", True, "gpu", None),
        # two 16-bit formats at once
        (True, "nf4", "bfloat16", "16-mixed", True, "gpu", "quant.compute_dtype='float16'"),
        (True, "nf4", "bfloat16", "16-true", False, "gpu", "two different 16-bit formats"),
        (True, "nf4", "float16", "bf16-mixed", True, "gpu", "quant.compute_dtype='bfloat16'"),
        (True, "nf4", "float16", "16-mixed", True, "gpu", None),
        # nothing to check without quantization
        (False, "none", "bfloat16", "64-true", True, "cpu", None),
    ],
)
def test_check_compatible(lora, mode, compute, precision, training, accelerator, error):
    args = (LoRAArgs(enabled=lora), QuantArgs(mode=mode, compute_dtype=compute), precision, training, accelerator)
    if error is None:
        check_compatible(*args)
    else:
        with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(".", r"\.")):
            check_compatible(*args)


# --- from_pretrained kwargs ----------------------------------------------------------------------------------


def test_quantization_config_maps_every_field(bnb):
    assert quantization_config(QuantArgs()) is None
    nf4 = quantization_config(QuantArgs(mode="nf4", compute_dtype="float32", double_quant=False))
    assert nf4.load_in_4bit and not nf4.load_in_8bit
    assert (nf4.bnb_4bit_quant_type, nf4.bnb_4bit_compute_dtype, nf4.bnb_4bit_use_double_quant) == (
        "nf4",
        torch.float32,
        False,
    )
    fp4 = quantization_config(QuantArgs(mode="fp4"), skip_modules=["head"])
    assert (fp4.bnb_4bit_quant_type, fp4.bnb_4bit_compute_dtype, fp4.bnb_4bit_use_double_quant) == (
        "fp4",
        torch.bfloat16,
        True,
    )
    assert fp4.llm_int8_skip_modules == ["head"]
    int8 = quantization_config(QuantArgs(mode="int8"))
    assert int8.load_in_8bit and not int8.load_in_4bit


def test_from_pretrained_kwargs(bnb):
    assert from_pretrained_kwargs(QuantArgs()) == {}
    assert from_pretrained_kwargs(QuantArgs(), dtype=torch.bfloat16) == {"dtype": torch.bfloat16}
    kwargs = from_pretrained_kwargs(QuantArgs(mode="nf4"), device="cpu")
    assert kwargs["device_map"] == {"": "cpu"}
    assert kwargs["dtype"] is torch.bfloat16
    assert kwargs["quantization_config"].load_in_4bit


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ImportError, match=r"pavlit\[quant\]"):
        quantization_config(QuantArgs(mode="nf4"))
    assert quantization_config(QuantArgs()) is None  # no quantization, no bitsandbytes needed


# --- LoRA on a full-precision model ------------------------------------------------------------------------------


def test_disabled_lora_returns_the_model_unchanged():
    model = tiny_llama()
    assert apply_lora(model, LoRAArgs()) is model
    assert all(p.requires_grad for p in model.parameters())


def test_lora_trains_only_adapters_and_logs_the_count(caplog):
    base_total = count_parameters(tiny_llama())[1]
    with caplog.at_level(logging.INFO, logger="pavlit.models.lora"):
        model = apply_lora(tiny_llama(), LoRAArgs(enabled=True, r=4, dropout=0.0))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert not any("lm_head" in name for name in trainable)  # the output layer gets no adapter
    assert count_parameters(model) == (4 * LORA_VALUES_PER_RANK, base_total + 4 * LORA_VALUES_PER_RANK)
    assert f"{4 * LORA_VALUES_PER_RANK} trainable of {base_total + 4 * LORA_VALUES_PER_RANK}" in caplog.text


def test_lora_on_named_modules_only():
    model = apply_lora(tiny_llama(), LoRAArgs(enabled=True, r=2, target_modules=["q_proj", "v_proj"]))
    assert count_parameters(model)[0] == LAYERS * 2 * 2 * (HIDDEN + HIDDEN)


def test_head_trains_fully_and_one_step_moves_only_adapters_and_head():
    model = apply_lora(Verifier(tiny_llama()), LoRAArgs(enabled=True, r=4, dropout=0.0), modules_to_save=["value_head"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora_names = {name for name in trainable if "lora_" in name}
    head_names = trainable - lora_names
    assert {name.rsplit(".", 1)[-1] for name in head_names} == {"weight", "bias"}
    assert all(".value_head." in name for name in head_names)
    # the backbone's (unused) LM head gets no adapter even though the wrapper is not a Hugging Face model
    assert not any("lm_head" in name for name in lora_names)
    assert count_parameters(model)[0] == 4 * LORA_VALUES_PER_RANK + HIDDEN + 1

    before = snapshot(model)
    sgd_step(model, model(tokens()).pow(2).mean())
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= trainable
    # lora_B starts at zero, so the first step moves every B (and the head); A's gradient is zero until B moves
    assert {name for name in lora_names if "lora_B" in name} <= changed
    assert head_names <= changed


@pytest.mark.parametrize("wrap", [False, True])
def test_gradient_checkpointing_keeps_gradients_flowing(wrap):
    base = tiny_llama()
    model = Verifier(base) if wrap else base
    model = apply_lora(model, LoRAArgs(enabled=True, r=4, dropout=0.0), gradient_checkpointing=True).train()
    assert base.model.gradient_checkpointing
    ids = tokens()
    loss = model(ids).pow(2).mean() if wrap else model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_modules_to_save_must_exist():
    with pytest.raises(ValueError, match="'score'"):
        apply_lora(Verifier(tiny_llama()), LoRAArgs(enabled=True), modules_to_save=["score"])


def test_modules_to_save_name_that_peft_would_overmatch_is_refused():
    # peft selects modules to save by plain suffix: "head" would also fully train "backbone.lm_head"
    with pytest.raises(ValueError, match=r"backbone\.lm_head"):
        apply_lora(Verifier(tiny_llama(), head_name="head"), LoRAArgs(enabled=True), modules_to_save=["head"])


def test_quant_args_must_match_the_loaded_model():
    with pytest.raises(ValueError, match="no bitsandbytes layers"):
        apply_lora(tiny_llama(), LoRAArgs(enabled=True), QuantArgs(mode="nf4"))


def test_save_then_load_adapter_restores_identical_outputs(tmp_path):
    model = apply_lora(Verifier(tiny_llama()), LoRAArgs(enabled=True, r=4, dropout=0.0), modules_to_save=["value_head"])
    sgd_step(model, model(tokens()).pow(2).mean())
    model.eval()
    with torch.no_grad():
        expected = model(tokens(3))

    folder = save_adapter(model, tmp_path / "adapter")
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    # only adapters and the head were written, not the base weights
    from safetensors.torch import load_file

    saved = load_file(folder / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == 4 * LORA_VALUES_PER_RANK + HIDDEN + 1

    restored = load_adapter(Verifier(tiny_llama()), folder)
    with torch.no_grad():
        assert torch.equal(restored(tokens(3)), expected)
    assert not any(p.requires_grad for p in restored.parameters())
    assert torch.is_tensor(expected) and not torch.equal(Verifier(tiny_llama())(tokens(3)), expected)


def test_adapter_io_errors(tmp_path):
    with pytest.raises(TypeError, match="apply_lora"):
        save_adapter(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path)


# --- bitsandbytes on CPU -----------------------------------------------------------------------------------------


def force_bnb_cpu_kernel(monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    """Make bitsandbytes believe the CPU has (or lacks) AVX512-BF16, for the 4-bit layers built from now on.

    ``Linear4bit.__init__`` reads ``has_avx512bf16()`` to decide whether its first inference forward repacks the
    weight for the fused CPU kernel; patching it forces either branch whatever this machine's CPU has. The
    kernel itself is registered at import from the real capability, so a forced ``True`` can be run (not only
    selected) only on a CPU that has AVX512-BF16.
    """
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: fused)


def cpu_has_avx512_bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def dequantized(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float32 weights every 4-bit layer of ``model`` represents, whichever layout bitsandbytes stores."""
    import copy

    import bitsandbytes.functional as F

    weights = {}
    for name, module in model.named_modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        data, state = module.weight.data, module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = F._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        weights[name] = F.dequantize_4bit(data, state).float()
    return weights


@pytest.mark.parametrize("fused", [False, True], ids=["generic-cpu", "avx512bf16-cpu"])
def test_qlora_nf4_trains_adapters_and_reloads(bnb, tiny_dir, tmp_path, monkeypatch, fused):
    force_bnb_cpu_kernel(monkeypatch, fused)
    quant = QuantArgs(mode="nf4", compute_dtype="float32")
    lora = LoRAArgs(enabled=True, r=4, dropout=0.0)
    check_compatible(lora, quant, precision="32-true", training=True, accelerator="cpu")
    base = load_quantized(tiny_dir, quant, device="cpu")
    assert quantized_bits(base) == 4
    assert isinstance(base.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    # packed 4-bit weights are counted as the values they hold
    assert count_parameters(base)[1] == count_parameters(tiny_llama())[1]
    with pytest.raises(ValueError, match="lora.enabled=False"):
        check_compatible(LoRAArgs(), quant, training=True)
    # the 4-bit weights represent the float weights up to NF4 rounding: half the widest gap between NF4 levels,
    # (1 - 0.6962) / 2 of each 64-value block's absmax, plus the 8-bit rounding of that absmax (double quant)
    reference = dict(tiny_llama().named_modules())
    weights = dequantized(base)
    assert len(weights) == LAYERS * 7
    for name, weight in weights.items():
        exact = reference[name].weight.detach()
        assert weight.shape == exact.shape
        error, scale = (weight - exact).reshape(-1, 64).abs(), exact.reshape(-1, 64).abs().amax(1, keepdim=True)
        assert (error <= 0.16 * scale).all()

    model = apply_lora(base, lora, quant)
    # training never repacks in place, whichever kernel bitsandbytes offers
    assert set(cpu_4bit_kernels(model).values()) == {"generic"}
    before, before_weights = snapshot(model), dequantized(model)
    ids = tokens()
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    sgd_step(model, out.loss)
    # a validation pass in between (eval mode, no grad), then training again: what Lightning does every epoch
    model.eval()
    with torch.no_grad():
        model(input_ids=tokens(4))
    model.train()
    sgd_step(model, model(input_ids=ids, labels=ids).loss)
    after = snapshot(model)
    assert all(not torch.equal(before[n], after[n]) for n in after if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in after if "lora_" not in n and "weight" not in n)
    after_weights = dequantized(model)
    assert all(torch.equal(before_weights[n], after_weights[n]) for n in before_weights)

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens(3)).logits
    folder = save_adapter(model, tmp_path / "qlora")
    restored = load_adapter(load_quantized(tiny_dir, quant, device="cpu"), folder, trainable=True)
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(input_ids=tokens(3)).logits, expected)
    assert {n for n, p in restored.named_parameters() if p.requires_grad} == {n for n in after if "lora_" in n}


@pytest.mark.parametrize(
    ("fused", "compute_dtype", "kernel", "reason"),
    [
        (True, "bfloat16", "avx512-bf16", None),
        (True, "float32", "generic", "compute_dtype is float32"),
        (False, "bfloat16", "generic", None),
    ],
)
def test_4bit_inference_kernel_is_chosen_per_layer(
    bnb, tiny_dir, monkeypatch, caplog, fused, compute_dtype, kernel, reason
):
    force_bnb_cpu_kernel(monkeypatch, fused)
    with caplog.at_level(logging.INFO, logger="pavlit.models.quantization"):
        model = load_quantized(tiny_dir, QuantArgs(mode="nf4", compute_dtype=compute_dtype), device="cpu")
    kernels = cpu_4bit_kernels(model)
    assert len(kernels) == LAYERS * 7 and set(kernels.values()) == {kernel}
    if reason is not None:
        assert f"0 of {LAYERS * 7} layers use bitsandbytes' AVX512-BF16 kernel" in caplog.text and reason in caplog.text
    # a model that will be trained never keeps the fused (inference-only, in-place) kernel
    apply_lora(model, LoRAArgs(enabled=True, r=2), QuantArgs(mode="nf4", compute_dtype=compute_dtype))
    assert set(cpu_4bit_kernels(model).values()) == {"generic"}


def test_4bit_inference_on_layers_narrower_than_the_block_size(bnb, tmp_path, monkeypatch, caplog):
    # hidden 32 < the 4-bit block size 64: bitsandbytes' AVX512-BF16 repacking fails on such layers
    # ("shape '[32, 0]' is invalid"); pavlit keeps them quantized on the generic kernel instead.
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    quant = QuantArgs(mode="nf4", compute_dtype="bfloat16")
    logits = {}
    for fused in (True, False):
        force_bnb_cpu_kernel(monkeypatch, fused)
        with caplog.at_level(logging.INFO, logger="pavlit.models.quantization"):
            model = load_quantized(tmp_path, quant, device="cpu")
        kernels = cpu_4bit_kernels(model)
        # only down_proj (64 -> 32) has an input as wide as a block, and its 32 outputs fit the layout
        assert {n for n, k in kernels.items() if k == "avx512-bf16"} == (
            {"model.layers.0.mlp.down_proj"} if fused else set()
        )
        if not cpu_has_avx512_bf16():
            model.model.layers[0].mlp.down_proj.support_avx512bf16_for_cpu = False  # forced: not runnable here
        with torch.no_grad():
            logits[fused] = model(input_ids=tokens()).logits.float()
    assert "input width 32 is not a multiple of the 4-bit block size 64" in caplog.text
    assert torch.isfinite(logits[True]).all()
    assert (logits[True] - logits[False]).abs().max() <= 0.05 * logits[False].abs().max()


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the fused kernel runs only on a CPU with AVX512-BF16")
def test_avx512_bf16_kernel_matches_the_generic_kernel(bnb, tiny_dir, monkeypatch):
    quant = QuantArgs(mode="nf4", compute_dtype="bfloat16")
    fused_model = load_quantized(tiny_dir, quant, device="cpu")
    assert set(cpu_4bit_kernels(fused_model).values()) == {"avx512-bf16"}
    weights = dequantized(fused_model)
    with torch.no_grad():
        fused = fused_model(input_ids=tokens(3)).logits.float()
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for _, m in _layers4(fused_model))
    force_bnb_cpu_kernel(monkeypatch, False)
    generic_model = load_quantized(tiny_dir, quant, device="cpu")
    with torch.no_grad():
        generic = generic_model(input_ids=tokens(3)).logits.float()
    # both compute in bfloat16 from the same 4-bit codes; the fused layout keeps the block scales in bfloat16
    assert (fused - generic).abs().max() <= 0.05 * generic.abs().max()
    for name, weight in dequantized(generic_model).items():
        assert torch.allclose(weights[name], weight, rtol=1e-2, atol=1e-3)
    # once repacked for inference, the model cannot be trained: load it again
    with pytest.raises(ValueError, match="load the model again"):
        apply_lora(fused_model, LoRAArgs(enabled=True), quant)


def _layers4(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "support_avx512bf16_for_cpu")]


def test_int8_lora_trains_on_cpu(bnb, tiny_dir):
    quant = QuantArgs(mode="int8", compute_dtype="float32")
    model = apply_lora(load_quantized(tiny_dir, quant, device="cpu"), LoRAArgs(enabled=True, r=4, dropout=0.0), quant)
    assert quantized_bits(model) == 8
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    before = snapshot(model)
    ids = tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "MatMul8bitLt: inputs will be cast from float32 to float16"
        sgd_step(model, model(input_ids=ids, labels=ids).loss)
    after = snapshot(model)
    assert all(not torch.equal(before[n], after[n]) for n in after if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in after if "lora_" not in n)


def test_quantized_head_cannot_train_fully(bnb, tiny_dir):
    base = load_quantized(tiny_dir, QuantArgs(mode="nf4"), device="cpu", skip_modules=[])
    assert isinstance(base.lm_head, bnb.nn.Linear4bit)
    with pytest.raises(ValueError, match="'lm_head'.*quantized"):
        apply_lora(base, LoRAArgs(enabled=True), modules_to_save=["lm_head"])
