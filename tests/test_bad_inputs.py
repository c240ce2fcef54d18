"""Bad checkpoints fail closed: each gets a specific error type and a message naming file, key, expected, found."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import official_layouts as layouts
from adapter_cases import make
from tenfold.adapters import (AdapterFormatError, AdapterKeyError, AdapterMismatchError, AdapterTooLargeError,
                              AdapterValueError, ModelSpec, load_adapter, save_adapter)

WIDER = ModelSpec(num_layers=3, hidden_size=512, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1024)


def peft_lora_dir(directory, tensors, **config):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def lora_pair(layer=0, module="q_proj", block="self_attn", fan_in=256, fan_out=256, r=4):
    path = f"base_model.model.model.layers.{layer}.{block}.{module}"
    return {f"{path}.lora_A.weight": torch.randn(r, fan_in), f"{path}.lora_B.weight": torch.randn(fan_out, r)}


def all_layers(**kwargs):
    tensors = {}
    for layer in range(3):
        tensors.update(lora_pair(layer=layer, **kwargs))
    return tensors


@pytest.fixture
def saved_lora(specs, tmp_path):
    adapter = make("lora", specs["mha"], seed=91)
    adapter.validate(specs["mha"])
    return save_adapter(adapter, tmp_path / "good")


def test_truncated_safetensors(saved_lora, specs):
    path = saved_lora / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors: corrupt or truncated"):
        load_adapter(saved_lora, specs["mha"])


def test_invalid_json(saved_lora, specs):
    (saved_lora / "adapter_config.json").write_text('{"format": "tenfold",')
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json: not valid JSON"):
        load_adapter(saved_lora, specs["mha"])


def test_missing_weights_and_missing_directory(saved_lora, specs, tmp_path):
    (saved_lora / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="no tensor file: expected adapter_model.safetensors"):
        load_adapter(saved_lora, specs["mha"])
    with pytest.raises(AdapterFormatError, match="not a directory"):
        load_adapter(tmp_path / "absent", specs["mha"])


def test_wrong_shapes_for_the_base_model(saved_lora):
    with pytest.raises(AdapterMismatchError, match=r"key 'layers\.0\.down_proj\.lora_A': expected shape \[8, 1024\] "
                                                    r"for this base model, found \[8, 512\]"):
        load_adapter(saved_lora, WIDER)


@pytest.mark.parametrize("bad, error, message", [
    (float("nan"), AdapterValueError, "NaN/Inf values"),
    (float("inf"), AdapterValueError, "NaN/Inf values"),
])
def test_non_finite_factors(bad, error, message, specs, tmp_path):
    adapter = make("lorta_heads_out", specs["mha"], seed=92)
    adapter.tensor("lora_C_h").data[1, 2] = bad
    save_adapter(adapter, tmp_path / "x")
    with pytest.raises(error, match=rf"key 'lora_C_h': 1 {message}"):
        load_adapter(tmp_path / "x", specs["mha"])


def test_integer_tensor(specs, tmp_path):
    tensors = all_layers()
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 256, dtype=torch.int32)
    peft_lora_dir(tmp_path / "int", tensors)
    with pytest.raises(AdapterValueError, match=r"key 'layers\.1\.q_proj\.lora_A': expected a floating-point tensor, "
                                                r"found dtype torch\.int32"):
        load_adapter(tmp_path / "int", specs["mha"])


def test_unknown_peft_type(tmp_path, specs):
    peft_lora_dir(tmp_path / "ia3", all_layers(), peft_type="IA3")
    with pytest.raises(AdapterFormatError, match=r"unknown adapter type 'IA3'.*BONE, BOTTLENECK, LORA, LORTA, MISS"):
        load_adapter(tmp_path / "ia3", specs["mha"])


def test_keys_naming_modules_the_model_lacks(tmp_path, specs):
    peft_lora_dir(tmp_path / "qkv", all_layers(module="qkv_proj"), target_modules=["qkv_proj"])
    with pytest.raises(AdapterKeyError, match=r"layers\.0\.qkv_proj match no module of the base model: expected one "
                                              r"of q_proj"):
        load_adapter(tmp_path / "qkv", specs["mha"])


def test_keys_not_of_the_per_layer_form(tmp_path, specs):
    tensors = all_layers()
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, 256)
    peft_lora_dir(tmp_path / "head", tensors)
    with pytest.raises(AdapterKeyError, match=r"1 tensor key\(s\) match no per-layer module.*lm_head"):
        load_adapter(tmp_path / "head", specs["mha"])


def test_partial_checkpoint(tmp_path, specs):
    tensors = all_layers() | all_layers(module="v_proj")
    del tensors["base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight"]
    del tensors["base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"]
    peft_lora_dir(tmp_path / "partial", tensors, target_modules=["q_proj", "v_proj"])
    with pytest.raises(AdapterKeyError, match=r"only part of the targeted modules: missing \['layers\.2\.v_proj'\]"):
        load_adapter(tmp_path / "partial", specs["mha"])


def test_layer_beyond_the_model(tmp_path, specs):
    tensors = all_layers() | lora_pair(layer=7)
    peft_lora_dir(tmp_path / "deep", tensors)
    with pytest.raises(AdapterMismatchError, match="layer 7 does not exist: the base model has 3 layers"):
        load_adapter(tmp_path / "deep", specs["mha"])


def test_bat_rank_must_divide_the_widths(tmp_path, specs):
    adapter = make("bat", specs["mha"], seed=93)
    save_adapter(adapter, tmp_path / "bat")
    config = json.loads((tmp_path / "bat" / "adapter_config.json").read_text())
    config["config"]["r"] = 24
    (tmp_path / "bat" / "adapter_config.json").write_text(json.dumps(config))
    message = r"key .layers\.0\.down_proj\.miss_block.: Bat needs r to divide both widths of down_proj: r=24, in=512"
    with pytest.raises(AdapterMismatchError, match=message):
        load_adapter(tmp_path / "bat", specs["mha"])


def test_lorta_unknown_orientation(tmp_path, specs):
    layouts.lorta_fork(make("lorta_heads_in", specs["mha"]), tmp_path / "fork")
    config = json.loads((tmp_path / "fork" / "adapter_config.json").read_text())
    config["orientation"] = "sideways"
    (tmp_path / "fork" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match=r"key 'orientation': expected one of .*found 'sideways'"):
        load_adapter(tmp_path / "fork", specs["mha"])


def test_lorta_on_a_model_with_other_head_count(tmp_path, specs):
    layouts.lorta_fork(make("lorta_heads_in", specs["mha"]), tmp_path / "fork")
    with pytest.raises(AdapterMismatchError, match=r"key 'lora_A': expected shape \[512, 8\]"):
        load_adapter(tmp_path / "fork", WIDER)


def test_size_limit(saved_lora, specs, monkeypatch):
    with pytest.raises(AdapterTooLargeError, match=r"over the adapter size limit of 100 bytes"):
        load_adapter(saved_lora, specs["mha"], max_bytes=100)
    monkeypatch.setenv("TENFOLD_MAX_ADAPTER_BYTES", "1000")
    with pytest.raises(AdapterTooLargeError, match="TENFOLD_MAX_ADAPTER_BYTES"):
        load_adapter(saved_lora, specs["mha"])


class NotATensor:
    pass


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, specs):
    directory = tmp_path / "evil"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "tensor_rank": 5, "target_modules": ["q_proj"]}))
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.layer.tensor.factors.0": NotATensor()},
               directory / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="cannot be read as a weights-only torch pickle"):
        load_adapter(directory, specs["mha"])


def test_tenfold_tensors_disagreeing_with_the_config(saved_lora, specs):
    config = json.loads((saved_lora / "adapter_config.json").read_text())
    config["tensors"]["layers.0.q_proj.lora_A"]["shape"] = [8, 999]
    (saved_lora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match=r"declares shape \[8, 999\], the file holds \[8, 256\]"):
        load_adapter(saved_lora, specs["mha"])


def test_dora_and_bias_are_refused(tmp_path, specs):
    peft_lora_dir(tmp_path / "dora", all_layers(), use_dora=True)
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json, key 'use_dora': expected false, found True; DoRA"):
        load_adapter(tmp_path / "dora", specs["mha"])


# --- settings tenfold does not serve (issue 18): each refused naming file, key, expected and found ------------------

def _lora_dir(tmp_path, **settings):
    return peft_lora_dir(tmp_path / "lora", all_layers(), **settings)


def _lorta_dir(tmp_path, **settings):
    spec = ModelSpec(num_layers=3, hidden_size=256, num_heads=4, num_kv_heads=4, head_dim=64, intermediate_size=512)
    return layouts.lorta_fork(make("lorta_heads_in", spec, seed=94), tmp_path / "lorta", **settings)


def _rep_dir(tmp_path, specs, **settings):
    adapter = make("loretta_rep", specs["mha"], seed=95)
    return layouts.loretta_rep(adapter, tmp_path / "rep", **settings)


def _adp_dir(tmp_path, specs, **settings):
    adapter = make("loretta_adp", specs["mha"], seed=96)
    return layouts.loretta_adp(adapter, tmp_path / "adp", **settings)


def _miss_dir(tmp_path, specs, **settings):
    adapter = make("miss", specs["mha"], seed=97)
    return layouts.bone_legacy(adapter, tmp_path / "bone", **settings)


REFUSED_SETTINGS = [
    # (writer, key, value, what the message says is expected)
    ("lora", "use_dora", True, "false"),
    ("lora", "lora_bias", True, "false"),
    ("lora", "bias", "all", "'none'"),
    ("lora", "modules_to_save", ["lm_head"], "null or \\[\\]"),
    ("lora", "layer_replication", [[0, 2], [1, 3]], "null"),
    ("lora", "target_parameters", ["mlp.experts.down_proj"], "null"),
    ("lora", "trainable_token_indices", [1, 2], "null"),
    ("lora", "alora_invocation_tokens", [5, 6, 7], "null"),
    ("lora", "use_qalora", True, "false"),
    ("lora", "monteclora_config", {"n_samples": 4}, "null"),
    ("lora", "use_bdlora", {"nblocks": 2}, "null"),
    ("lora", "arrow_config", {"top_k": 2}, "null"),
    ("lora", "kasa_config", {"beta": 1.0}, "null"),
    ("lora", "init_lora_weights", "pissa", "true, false, 'gaussian'"),
    ("lora", "init_lora_weights", "pissa_niter_4", "true, false, 'gaussian'"),
    ("lora", "init_lora_weights", "olora", "true, false, 'gaussian'"),
    ("lora", "init_lora_weights", "corda", "true, false, 'gaussian'"),
    ("lora", "init_lora_weights", "loftq", "true, false, 'gaussian'"),
    ("lora", "init_lora_weights", "lora_ga", "true, false, 'gaussian'"),
    ("lora", "a_future_peft_setting", 3, "the key to be absent or unset"),
    ("lorta", "use_dora", True, "false"),
    ("lorta", "bias", "lora_only", "'none'"),
    ("lorta", "modules_to_save", ["lm_head"], "null or \\[\\]"),
    ("lorta", "layer_replication", [[0, 2]], "null"),
    ("lorta", "megatron_config", {"tensor_model_parallel_size": 2}, "null"),
    ("lorta", "init_lora_weights", "loftq", "true, false or 'gaussian'"),
    ("lorta", "exclude_modules", ["k_proj"], "the key to be absent or unset"),  # not a setting of the fork
    ("loretta_rep", "bias", "all", "'none'"),
    ("loretta_rep", "modules_to_save", ["classifier"], "null or \\[\\]"),
    ("loretta_rep", "fan_in_fan_out", True, "false"),
    ("loretta_rep", "enable_lora", [True, False, True], "null"),
    ("loretta_rep", "layers_to_transform", [0], "the key to be absent or unset"),
    ("loretta_adp", "bias", "adapter_only", "'none'"),
    ("loretta_adp", "modules_to_save", ["classifier"], "null or \\[\\]"),
    ("miss", "bias", "all", "'none'"),
    ("miss", "modules_to_save", ["lm_head"], "null or \\[\\]"),
    ("miss", "use_dora", True, "the key to be absent or unset"),
]


@pytest.mark.parametrize("writer, key, value, expected", REFUSED_SETTINGS,
                         ids=[f"{w}-{k}-{v}" for w, k, v, _ in REFUSED_SETTINGS])
def test_unserved_settings_are_refused(writer, key, value, expected, specs, tmp_path):
    if writer == "lora":
        directory = _lora_dir(tmp_path, **{key: value})
    elif writer == "lorta":
        directory = _lorta_dir(tmp_path, **{key: value})
    else:
        directory = {"loretta_rep": _rep_dir, "loretta_adp": _adp_dir, "miss": _miss_dir}[writer](
            tmp_path, specs, **{key: value})
    message = rf"{directory}/adapter_config\.json, key '{key}': expected {expected}.*, found {re.escape(repr(value))}"
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(directory, specs["mha"])


def test_unset_unknown_settings_are_accepted(specs, tmp_path):
    """A key tenfold does not know, left unset (null, false, empty), changes nothing and is accepted."""
    directory = _lora_dir(tmp_path, a_future_peft_setting=None, another_one=False, a_third={})
    assert load_adapter(directory, specs["mha"]).family == "lora"


def test_peft_converted_pissa_config_is_accepted(specs, tmp_path):
    """PEFT's conversion writes init_lora_weights: true (and keeps the PiSSA sub-config keys it had)."""
    directory = _lora_dir(tmp_path, init_lora_weights=True, corda_config=None, loftq_config={})
    assert load_adapter(directory, specs["mha"]).family == "lora"


def test_lorta_scalings_that_do_not_factor_are_refused(specs, tmp_path):
    # q gets r=2 in layer 0 only, v in layer 1 only: the (layer, matrix) table is not a product, so it cannot live in
    # C_l x C_m
    directory = _lorta_dir(tmp_path, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, r"layers\.1\.self_attn\.v_proj": 2})
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json, key 'rank_pattern/alpha_pattern': expected "
                                                 r"per-module scalings that factor .*found scaling"):
        load_adapter(directory, specs["mha"])


def test_lorta_targets_that_differ_per_layer_are_refused(specs, tmp_path):
    directory = _lorta_dir(tmp_path, target_modules=["layers.0.self_attn.q_proj", "v_proj"])
    with pytest.raises(AdapterFormatError, match=r"key 'target_modules': expected the same attention matrices in every "
                                                 r"adapted layer.*found \['layers\.0\.self_attn\.q_proj', 'v_proj'\]"):
        load_adapter(directory, specs["mha"])


def test_two_tensors_for_one_module_name_both_keys(specs, tmp_path):
    tensors = all_layers()
    second = "base_model.model.model.layers.0.attn.q_proj.lora_A.weight"  # another path, the same module and tensor
    tensors[second] = torch.randn(4, 256)
    peft_lora_dir(tmp_path / "dup", tensors)
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(AdapterKeyError, match=r"adapter_model\.safetensors, key '.*': a second tensor for "
                                              r"lora_A\.weight of layers\.0\.q_proj: expected one, found it also "
                                              r"under '.*'") as error:
        load_adapter(tmp_path / "dup", specs["mha"])
    assert f"'{first}'" in str(error.value) and f"'{second}'" in str(error.value)


def test_tensors_outside_the_text_model_name_both_keys(specs, tmp_path):
    tensors = all_layers()
    vision = "base_model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    tensors[f"{vision}.lora_A.weight"] = torch.randn(4, 256)
    tensors[f"{vision}.lora_B.weight"] = torch.randn(256, 4)
    peft_lora_dir(tmp_path / "vlm", tensors)
    text = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(AdapterKeyError, match=rf"key '{re.escape(vision)}\.lora_A\.weight': a tensor for a module "
                                              rf"outside the served text model.*like '{re.escape(text)}'"):
        load_adapter(tmp_path / "vlm", specs["mha"])


def test_excluded_module_with_tensors_is_refused(specs, tmp_path):
    peft_lora_dir(tmp_path / "excl", all_layers() | all_layers(module="k_proj"), target_modules=["q_proj", "k_proj"],
                  exclude_modules=["k_proj"])
    with pytest.raises(AdapterKeyError, match=r"not targeted by the config \['layers\.0\.k_proj', 'layers\.1\.k_proj'"):
        load_adapter(tmp_path / "excl", specs["mha"])
    # honoured: the same checkpoint without the k_proj tensors loads
    peft_lora_dir(tmp_path / "ok", all_layers(), target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"])
    assert load_adapter(tmp_path / "ok", specs["mha"]).target_modules() == ["q_proj"]


def test_rank_disagreeing_with_rank_pattern(specs, tmp_path):
    peft_lora_dir(tmp_path / "rp", all_layers(), rank_pattern={"q_proj": 2})
    with pytest.raises(AdapterFormatError, match=r"q_proj\.lora_A\.weight': expected rank 2 \(r / rank_pattern of "
                                                 r"adapter_config\.json\), found a tensor of rank 4"):
        load_adapter(tmp_path / "rp", specs["mha"])


# --- a broken test environment fails CI instead of skipping quietly -------------------------------------------------

def _run_strict(tmp_path, test_source, required):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(test_source)
    env = {**__import__("os").environ, "CI": "true", "TENFOLD_CI_REQUIRED_IMPORTS": required}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_ci_fails_on_a_skip_without_an_accepted_reason(tmp_path):
    source = ("import pytest\n"
              "def test_gpu():\n    pytest.skip('needs CUDA')\n"
              "def test_ok():\n    pass\n")
    assert _run_strict(tmp_path, source, "json").returncode == 0  # an accepted reason
    source += "def test_quiet():\n    pytest.skip('something is missing')\n"
    result = _run_strict(tmp_path, source, "json")
    assert result.returncode == 1 and "skips without an accepted reason" in result.stdout
    assert "test_quiet: " in result.stdout and "something is missing" in result.stdout


def test_ci_fails_when_a_required_module_cannot_be_imported(tmp_path):
    result = _run_strict(tmp_path, "import pytest\nvllm = pytest.importorskip('no_such_module_x')\n"
                                   "def test_engine():\n    pass\n", "json,no_such_module_x")
    assert result.returncode != 0
    assert "CI: no_such_module_x cannot be imported" in result.stdout + result.stderr


def test_missing_target_modules_means_peft_default(specs, tmp_path):
    """PEFT fills a missing target_modules with q_proj and v_proj for every architecture tenfold serves."""
    directory = tmp_path / "default"
    peft_lora_dir(directory, all_layers() | all_layers(module="v_proj"))
    config = json.loads((directory / "adapter_config.json").read_text())
    del config["target_modules"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    assert load_adapter(directory, specs["mha"]).target_modules() == ["q_proj", "v_proj"]
    peft_lora_dir(tmp_path / "q_only", all_layers())
    config["target_modules"] = None
    (tmp_path / "q_only" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterKeyError, match=r"missing \['layers\.0\.v_proj', 'layers\.1\.v_proj', 'layers\.2\.v_proj'\]"):
        load_adapter(tmp_path / "q_only", specs["mha"])


def test_layers_pattern_of_another_layer_list_is_refused(specs, tmp_path):
    peft_lora_dir(tmp_path / "h", all_layers(), layers_to_transform=[0, 1, 2], layers_pattern="h")
    with pytest.raises(AdapterFormatError, match=r"key 'layers_pattern': expected 'layers' .*found 'h'"):
        load_adapter(tmp_path / "h", specs["mha"])
