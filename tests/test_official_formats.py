"""Official checkpoint layouts load to the same math: the LoRTA fork (both orientations), LoRETTA rep and adp
(pickled), adapters saved by PEFT itself (LoRA with patterns, MiSS default/mini/bat) and legacy Bone."""

from __future__ import annotations

import pytest
import torch

import official_layouts as layouts
from adapter_cases import make
from tenfold.adapters import attach, load_adapter


def logits(model, adapter, seed=81):
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), attach(model, adapter):
        return model(ids).logits


@pytest.mark.parametrize("orientation", ["heads_in", "heads_out"])
def test_lorta_fork_layout(orientation, model_name, hf_models, specs, tmp_path):
    spec = specs[model_name]
    original = make("lorta_heads_in", spec, seed=82, orientation=orientation)
    layouts.lorta_fork(original, tmp_path / "fork")
    loaded = load_adapter(tmp_path / "fork", spec, lorta_orientation=orientation)
    assert loaded.family == "lorta" and loaded.config["orientation"] == orientation
    assert torch.equal(logits(hf_models[model_name], loaded), logits(hf_models[model_name], original))
    if orientation == "heads_in":  # the fork's own default, nothing to declare
        assert load_adapter(tmp_path / "fork", spec).config["orientation"] == "heads_in"
    layouts.lorta_fork(original, tmp_path / "declared", record_orientation=True)
    assert load_adapter(tmp_path / "declared", spec).config["orientation"] == orientation


def test_lorta_fork_delta_formula(specs):
    """Independent check on the MHA model: the fork's _compute_weights_from_tensor, applied as x @ D^T."""
    spec = specs["mha"]
    adapter = make("lorta_heads_in", spec, seed=83)
    adapter.validate(spec)
    a, b = adapter.tensor("lora_A"), adapter.tensor("lora_B")
    c_l, c_h, c_m = adapter.tensor("lora_C_l"), adapter.tensor("lora_C_h"), adapter.tensor("lora_C_m")
    scale = adapter.config["lora_alpha"] / adapter.config["r"]
    for layer in range(spec.num_layers):
        for m, module in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
            d = torch.cat([a @ torch.diag(c_h[h] * c_m[m] * c_l[layer]) @ b for h in range(spec.num_heads)], dim=1)
            torch.testing.assert_close(adapter.delta((layer, module)), scale * d, rtol=1e-5, atol=1e-6)


def test_loretta_rep_official_layout(model_name, hf_models, specs, tmp_path):
    spec = specs[model_name]
    original = make("loretta_rep", spec, seed=84)
    original.validate(spec)
    layouts.loretta_rep(original, tmp_path / "rep")
    loaded = load_adapter(tmp_path / "rep", spec)
    assert loaded.family == "loretta_rep"
    assert torch.equal(logits(hf_models[model_name], loaded), logits(hf_models[model_name], original))
    # independent math: contract the cores in order, reshape row-major, delta = s * (W_A @ W_B)^T
    key = (1, "v_proj")
    fan_in, fan_out = spec.module_shape("v_proj")
    r = original.config["r"]

    def full(cores, shape):
        out = cores[0]
        for core in cores[1:]:
            out = torch.tensordot(out, core, dims=([-1], [0]))
        return out.reshape(shape)

    w_a = full(loaded.cores(key, "lora_A"), (fan_in, r))
    w_b = full(loaded.cores(key, "lora_B"), (r, fan_out))
    expected = (original.config["lora_alpha"] / r) * (w_a @ w_b).t()
    torch.testing.assert_close(loaded.delta(key), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("learned", [None, 0.7])
def test_loretta_adp_official_layout_against_hook_reference(learned, model_name, hf_models, specs, tmp_path):
    """An independent forward: hooks add s*adp(x) to gate/up inputs and s*adp(y) to down outputs."""
    spec, model = specs[model_name], hf_models[model_name]
    original = make("loretta_adp", spec, seed=85)
    original.validate(spec)
    layouts.loretta_adp(original, tmp_path / "adp", learned_scaling=learned)
    loaded = load_adapter(tmp_path / "adp", spec)
    assert loaded.family == "loretta_adp"
    scaling = learned if learned is not None else original.config["scaling"]
    act = {"tanh": torch.tanh, "relu": torch.relu}[original.config["non_linearity"]]

    def adp(key, z):
        name = f"layers.{key[0]}.{key[1]}"
        mats = []
        for part, shape in (("adapter_down", (spec.hidden_size, -1)), ("adapter_up", (-1, spec.hidden_size))):
            cores = [original.tensor(f"{name}.{part}.cores.{k}") for k in range(len(original._cores[key][part]))]
            out = cores[0]
            for core in cores[1:]:
                out = torch.tensordot(out, core, dims=([-1], [0]))
            mats.append((out.reshape(shape), original.tensor(f"{name}.{part}.bias")))
        (w_down, b_down), (w_up, b_up) = mats
        return scaling * (act(z @ w_down + b_down) @ w_up + b_up)

    handles = []
    for layer_index, layer in enumerate(model.model.layers):
        for module in ("gate_proj", "up_proj"):
            key = (layer_index, module)
            handles.append(getattr(layer.mlp, module).register_forward_pre_hook(
                lambda mod, args, key=key: (args[0] + adp(key, args[0]),)))
        key = (layer_index, "down_proj")
        handles.append(layer.mlp.down_proj.register_forward_hook(lambda mod, args, out, key=key: out + adp(key, out)))
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(81))
    try:
        with torch.no_grad():
            reference = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    ours = logits(model, loaded)
    assert (ours - reference).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (ours - model(ids).logits).abs().max() > 0.01, "the adapter must change the logits"


def _randomize(peft_model, names, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("init", [True, "mini", "bat"])
def test_adapters_saved_by_peft_miss(init, model_name, tiny_model_dirs, hf_models, specs, tmp_path):
    """Our forward == PEFT's own forward, for MiSS adapters created and saved by PEFT."""
    from peft import MissConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[model_name], dtype=torch.float32).eval()
    config = MissConfig(r=16, init_weights=init, mini_r=32 if init == "mini" else 1,
                        target_modules=["q_proj", "v_proj", "down_proj", "up_proj"])
    peft_model = get_peft_model(fresh, config).eval()
    _randomize(peft_model, ["miss_block"], scale=0.02, seed=86)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(81))
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "miss")
    loaded = load_adapter(tmp_path / "miss", specs[model_name])
    assert loaded.family == ("bat" if init == "bat" else "miss")
    ours = logits(hf_models[model_name], loaded)
    assert (ours - theirs).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (ours - hf_models[model_name](ids).logits).abs().max() > 0.01


def test_adapter_saved_by_peft_lora_with_patterns(model_name, tiny_model_dirs, hf_models, specs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[model_name], dtype=torch.float32).eval()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"],
                        rank_pattern={"gate_proj": 4}, alpha_pattern={"v_proj": 4}, use_rslora=False)
    peft_model = get_peft_model(fresh, config).eval()
    _randomize(peft_model, ["lora_A", "lora_B"], scale=0.05, seed=87)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(81))
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "lora")
    loaded = load_adapter(tmp_path / "lora", specs[model_name])
    assert loaded.family == "lora" and loaded.scaling((0, "v_proj")) == 4 / 8 and loaded.scaling((0, "gate_proj")) == 4
    assert (logits(hf_models[model_name], loaded) - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["miss", "bat"])
def test_legacy_bone_layout(case, hf_models, specs, tmp_path):
    spec = specs["gqa"]
    original = make(case, spec, seed=88)
    original.validate(spec)
    layouts.bone_legacy(original, tmp_path / "bone")
    loaded = load_adapter(tmp_path / "bone", spec)
    assert loaded.family == original.family
    assert torch.equal(logits(hf_models["gqa"], loaded), logits(hf_models["gqa"], original))
