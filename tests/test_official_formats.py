"""Official checkpoint layouts load to the same math: the LoRTA fork (both orientations), LoRETTA rep and adp
(pickled), adapters saved by PEFT itself (LoRA with patterns, MiSS default/mini/bat) and legacy Bone."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import official_layouts as layouts
from adapter_cases import make, randomize_peft
from tenfold.adapters import AdapterFormatError, attach, load_adapter, save_adapter
from tenfold.adapters.attach import find_linears


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


@pytest.mark.parametrize("init", [True, "mini", "bat"])
def test_adapters_saved_by_peft_miss(init, model_name, tiny_model_dirs, hf_models, specs, tmp_path):
    """Our forward == PEFT's own forward, for MiSS adapters created and saved by PEFT."""
    from peft import MissConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[model_name], dtype=torch.float32).eval()
    config = MissConfig(r=16, init_weights=init, mini_r=32 if init == "mini" else 1,
                        target_modules=["q_proj", "v_proj", "down_proj", "up_proj"])
    peft_model = get_peft_model(fresh, config).eval()
    randomize_peft(peft_model, ["miss_block"], scale=0.02, seed=86)
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
    randomize_peft(peft_model, ["lora_A", "lora_B"], scale=0.05, seed=87)
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


# --- every documented setting (issue 18): honoured exactly against the producer, or refused -------------------------

def _peft_lora_logits(model_dir, config, seed):
    """(PEFT model, its logits) for a fresh model with `config` and random non-zero factors."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft_model = get_peft_model(fresh, config).eval()
    randomize_peft(peft_model, ["lora_A", "lora_B"], scale=0.05, seed=seed)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(81))
    with torch.no_grad():
        return peft_model, peft_model(ids).logits


PEFT_LORA_SETTINGS = {
    # rsLoRA with per-module rank and alpha patterns (a regex and a plain suffix)
    "rslora_patterns": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"down_proj": 4, r"layers\.1\.self_attn\.q_proj": 2},
                            alpha_pattern={"v_proj": 3}),
    # exclude_modules next to a regex-free list, and layers_to_transform with its layers_pattern
    "exclude_layers": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
                           exclude_modules=["k_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
    # a full-match regex target with a regex exclusion
    "regex": dict(r=4, lora_alpha=4, target_modules=r".*\.(q_proj|o_proj|gate_proj)",
                  exclude_modules=r".*layers\.1\.self_attn\.o_proj"),
    # PEFT's shorthand for every linear layer, with an exclusion
    "all_linear": dict(r=2, lora_alpha=2, target_modules="all-linear", exclude_modules=["down_proj"]),
    # one layer index as an int
    "one_layer": dict(r=4, lora_alpha=2, target_modules=["o_proj", "gate_proj"], layers_to_transform=1),
}


@pytest.mark.parametrize("setting", sorted(PEFT_LORA_SETTINGS))
def test_peft_lora_settings_match_peft(setting, model_name, tiny_model_dirs, hf_models, specs, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(**PEFT_LORA_SETTINGS[setting])
    peft_model, theirs = _peft_lora_logits(tiny_model_dirs[model_name], config, seed=101)
    peft_model.save_pretrained(tmp_path / "lora")
    loaded = load_adapter(tmp_path / "lora", specs[model_name])
    # the modules PEFT adapted, independently from its own model
    adapted = {(int(n.split(".layers.")[1].split(".")[0]), n.rsplit(".", 1)[-1])
               for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "layers." in n and len(m.lora_A)}
    assert set(loaded.targets) == adapted
    ours = logits(hf_models[model_name], loaded)
    assert (ours - theirs).abs().max().item() <= 1e-5
    with torch.no_grad():
        base = hf_models[model_name](torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(81))).logits
    assert (ours - base).abs().max() > 1e-3


def test_peft_eva_style_rank_pattern_is_plain_lora(tiny_model_dirs, hf_models, specs, tmp_path):
    """init_lora_weights='eva' leaves the base weights untouched (PEFT only sets lora_A and redistributes ranks into
    rank_pattern): served as plain LoRA, equal to PEFT's forward."""
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
    peft_model, theirs = _peft_lora_logits(tiny_model_dirs["mha"], config, seed=102)
    peft_model.save_pretrained(tmp_path / "eva")
    cfg_path = tmp_path / "eva" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "init_lora_weights": "eva",
                                    "eva_config": {"rho": 2.0}}))
    assert (logits(hf_models["mha"], load_adapter(tmp_path / "eva", specs["mha"])) - theirs).abs().max() <= 1e-5


def test_pissa_needs_peft_conversion(tiny_model_dirs, hf_models, specs, tmp_path):
    """PiSSA rewrites the base (W - B0 A0): saved as is it is refused, naming the key and how to convert; PEFT's
    converted form is plain LoRA on the original base and equals the PiSSA model's own forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["mha"], dtype=torch.float32).eval()
    peft_model = get_peft_model(fresh, LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                  target_modules=["q_proj", "v_proj"])).eval()
    peft_model.save_pretrained(tmp_path / "initial")
    g = torch.Generator().manual_seed(103)
    with torch.no_grad():  # "training": move the factors away from their initial values
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(81))
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "raw")
    with pytest.raises(AdapterFormatError, match=r"raw/adapter_config\.json, key 'init_lora_weights': expected .*"
                                                 r"found 'pissa'.*path_initial_model_for_weight_conversion"):
        load_adapter(tmp_path / "raw", specs["mha"])
    peft_model.save_pretrained(tmp_path / "converted",
                               path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    converted = load_adapter(tmp_path / "converted", specs["mha"])
    assert converted.family == "lora" and converted.rank == 8
    assert (logits(hf_models["mha"], converted) - theirs).abs().max().item() <= 1e-4


def _fork_scale(config, layer, module):
    """The fork's per-module scaling, written out from tuners/lorta (model.py: first matching pattern key, rank keys
    first; layer.py: alpha/r or alpha/sqrt(r))."""
    path = f"model.layers.{layer}.self_attn.{module}"
    keys = list(config.get("rank_pattern", {})) + list(config.get("alpha_pattern", {}))
    key = next((k for k in keys if re.match(rf".*\.{k}$", path)), path)
    r = config.get("rank_pattern", {}).get(key, config["r"])
    alpha = config.get("alpha_pattern", {}).get(key, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


LORTA_FORK_SETTINGS = {
    "rslora": dict(use_rslora=True),
    "patterns": dict(rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 5}),
    "layers": dict(layers_to_transform=[0, 2], layers_pattern="layers", use_rslora=True,
                   alpha_pattern={"q_proj": 3}),
    "layer_int": dict(layers_to_transform=1, target_modules=["q_proj", "v_proj"]),
}


@pytest.mark.parametrize("setting", sorted(LORTA_FORK_SETTINGS))
def test_lorta_fork_settings_match_the_fork_formula(setting, hf_models, specs, tmp_path):
    """Each targeted (layer, matrix) gets the fork's delta cat_h(A diag(C_h[h] C_m[m] C_l[l]) B), applied as
    x @ delta^T times the fork's own scaling; untargeted layers and matrices get nothing. Checked on the weights and
    on the logits against a model with those deltas merged in."""
    spec, model = specs["mha"], hf_models["mha"]
    adapter = make("lorta_heads_in", spec, seed=104, r=4, lora_alpha=8)
    settings = LORTA_FORK_SETTINGS[setting]
    layouts.lorta_fork(adapter, tmp_path / "fork", **settings)
    config = {**json.loads((tmp_path / "fork" / "adapter_config.json").read_text())}
    loaded = load_adapter(tmp_path / "fork", spec)
    a, b = adapter.tensor("lora_A"), adapter.tensor("lora_B")
    c_l, c_h, c_m = adapter.tensor("lora_C_l"), adapter.tensor("lora_C_h"), adapter.tensor("lora_C_m")
    layers = settings.get("layers_to_transform", list(range(spec.num_layers)))
    layers = [layers] if isinstance(layers, int) else layers
    modules = config["target_modules"]
    expected = {}
    for layer in range(spec.num_layers):
        for m, module in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
            if layer in layers and module in modules:
                d = torch.cat([a @ torch.diag(c_h[h] * c_m[m] * c_l[layer]) @ b for h in range(spec.num_heads)], 1)
                expected[layer, module] = d * _fork_scale(config, layer, module)
    assert sorted(loaded.targets) == sorted(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(loaded.delta(key), delta, rtol=1e-5, atol=1e-7)
    # kept through tenfold's own format (what `tenfold convert` and the caches write)
    resaved = load_adapter(save_adapter(loaded, tmp_path / "tenfold"), spec)
    assert sorted(resaved.targets) == sorted(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(resaved.delta(key), delta, rtol=1e-5, atol=1e-7)
    # the same through the attached model (and the engine's shared factors): merged reference weights
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(81))
    linears = find_linears(model)
    saved = {key: linears[key][2].weight.data.clone() for key in expected}
    try:
        with torch.no_grad():
            for key, delta in expected.items():
                linears[key][2].weight.data += delta
            reference = model(ids).logits
    finally:
        for key, weight in saved.items():
            linears[key][2].weight.data.copy_(weight)
    assert (logits(model, loaded) - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("settings", [dict(exclude_modules=["o_proj"]), dict(layers_to_transform=[1])],
                         ids=["exclude", "layers"])
def test_peft_miss_settings_match_peft(settings, tiny_model_dirs, hf_models, specs, tmp_path):
    from peft import MissConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gqa"], dtype=torch.float32).eval()
    peft_model = get_peft_model(fresh, MissConfig(r=16, target_modules=["q_proj", "o_proj", "up_proj"],
                                                  **settings)).eval()
    randomize_peft(peft_model, ["miss_block"], scale=0.02, seed=105)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(81))
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "miss")
    loaded = load_adapter(tmp_path / "miss", specs["gqa"])
    assert (logits(hf_models["gqa"], loaded) - theirs).abs().max().item() <= 1e-5
