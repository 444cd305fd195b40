"""load_model on real checkpoint files of every supported format, written into tmp_path."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from calibexport.errors import CalibexportError
from calibexport.models import ModelSpec
from calibexport.models.loaders import LoadedModel, load_model, load_spec
from calibexport.models.native_format import save_native
from calibexport.models.weights_hash import weights_sha256


class CustomPayload:
    """A class that only full unpickling can rebuild."""

    def __init__(self) -> None:
        self.value = 3


def write_json_config(path: Path, spec: ModelSpec) -> Path:
    path.write_text(json.dumps(spec.to_dict()))
    return path


def ddim_yaml_dict(spec: ModelSpec) -> dict:
    unet = spec.unet
    return {
        "data": {"dataset": "TINY", "image_size": unet.resolution, "channels": unet.in_channels},
        "model": {
            "type": "simple", "in_channels": unet.in_channels, "out_ch": unet.out_ch,
            "ch": unet.ch, "ch_mult": list(unet.ch_mult), "num_res_blocks": unet.num_res_blocks,
            "attn_resolutions": list(unet.attn_resolutions), "dropout": unet.dropout,
            "var_type": "fixedlarge", "ema_rate": 0.9999, "ema": True,
            "resamp_with_conv": unet.resamp_with_conv,
        },
        "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                      "num_diffusion_timesteps": 1000},
        "training": {"batch_size": 128},
    }


def prefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"module.{key}": tensor for key, tensor in state.items()}


def ddim_list(model_state: dict, ema_state: dict | None) -> list:
    """Build the DDIM ckpt.pth layout with a real optimizer state_dict."""
    params = [torch.nn.Parameter(t.clone()) for t in model_state.values()]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    items = [prefixed(model_state), optimizer.state_dict(), 7, 1500]
    if ema_state is not None:
        items.append(ema_state)
    return items


@pytest.fixture
def ddim_checkpoint(tmp_path, tiny_spec, make_state):
    """A DDIM list checkpoint with different model and EMA weights, and its JSON config."""
    model_state, ema_state = make_state(1), make_state(2)
    path = tmp_path / "ckpt.pth"
    torch.save(ddim_list(model_state, ema_state), path)
    config = write_json_config(tmp_path / "tiny.json", tiny_spec)
    return path, config, model_state, ema_state


# Formats ----------------------------------------------------------------------------------------


def test_native_round_trip(tmp_path, tiny_spec, make_state, reference_net, run_net):
    state = make_state(0)
    path = tmp_path / "net.safetensors"
    save_native(path, state, tiny_spec, extra={"steps": 10})

    loaded = load_model(path)

    assert isinstance(loaded, LoadedModel)
    assert torch.equal(run_net(loaded.module), run_net(reference_net(state)))
    assert loaded.spec.to_dict() == tiny_spec.to_dict()
    assert loaded.source["format"] == "native"
    assert loaded.source["weights"] == "ema"
    assert loaded.source["weights_loaded"] == "unlabeled"
    assert loaded.source["config_kind"] == "json"
    assert loaded.source["config"] == str(tmp_path / "net.json")
    assert loaded.source["path"] == str(path)


def test_loaded_module_eval_float32_cpu(tmp_path, tiny_spec, make_state):
    state = {key: t.half() for key, t in make_state(0).items()}
    path = tmp_path / "half.pt"
    torch.save(state, path)

    module = load_model(path, config=str(write_json_config(tmp_path / "c.json", tiny_spec))).module

    assert not module.training
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert {p.device.type for p in module.parameters()} == {"cpu"}
    assert torch.equal(module.conv_in.weight, state["conv_in.weight"].float())


def test_ddim_list_ema_default(ddim_checkpoint, reference_net, run_net):
    path, config, _, ema_state = ddim_checkpoint

    loaded = load_model(path, config=str(config))

    assert torch.equal(run_net(loaded.module), run_net(reference_net(ema_state)))
    assert loaded.source["format"] == "ddim_list"
    assert loaded.source["weights_loaded"] == "ema"


def test_ddim_list_model_weights(ddim_checkpoint, reference_net, run_net):
    path, config, model_state, ema_state = ddim_checkpoint

    loaded = load_model(path, config=str(config), weights="model")

    assert torch.equal(run_net(loaded.module), run_net(reference_net(model_state)))
    assert not torch.equal(run_net(loaded.module), run_net(reference_net(ema_state)))
    assert loaded.source["weights"] == "model"
    assert loaded.source["weights_loaded"] == "model"


def test_ddim_list_ema_with_module_prefix(tmp_path, tiny_spec, make_state, reference_net,
                                          run_net):
    ema_state = make_state(2)
    path = tmp_path / "ckpt.pth"
    torch.save(ddim_list(make_state(1), prefixed(ema_state)), path)
    write_json_config(tmp_path / "ckpt.json", tiny_spec)

    loaded = load_model(path)

    assert torch.equal(run_net(loaded.module), run_net(reference_net(ema_state)))


def test_ddim_list_without_ema(tmp_path, tiny_spec, make_state, reference_net, run_net):
    model_state = make_state(1)
    path = tmp_path / "ckpt.pth"
    torch.save(ddim_list(model_state, None), path)
    config = str(write_json_config(tmp_path / "tiny.json", tiny_spec))

    with pytest.raises(CalibexportError, match="no EMA weights.*--weights model"):
        load_model(path, config=config)
    loaded = load_model(path, config=config, weights="model")
    assert torch.equal(run_net(loaded.module), run_net(reference_net(model_state)))


def test_state_dict_with_json_beside(tmp_path, tiny_spec, make_state, reference_net, run_net):
    state = make_state(3)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    write_json_config(tmp_path / "weights.json", tiny_spec)

    loaded = load_model(path)

    assert torch.equal(run_net(loaded.module), run_net(reference_net(state)))
    assert loaded.source["format"] == "state_dict"
    assert loaded.source["config_kind"] == "json"


def test_state_dict_with_ddim_yaml(tmp_path, tiny_spec, make_state, reference_net, run_net):
    state = make_state(3)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    (tmp_path / "weights.yml").write_text(yaml.safe_dump(ddim_yaml_dict(tiny_spec)))

    loaded = load_model(path)

    assert torch.equal(run_net(loaded.module), run_net(reference_net(state)))
    assert loaded.source["config_kind"] == "ddim_yaml"
    assert loaded.spec.to_dict() == tiny_spec.to_dict()


def test_state_dict_yaml_as_config_option(tmp_path, tiny_spec, make_state):
    path = tmp_path / "weights.pth"
    torch.save(make_state(3), path)
    config = tmp_path / "elsewhere.yaml"
    config.write_text(yaml.safe_dump(ddim_yaml_dict(tiny_spec)))

    loaded = load_model(path, config=str(config))

    assert loaded.source["config"] == str(config)


def test_state_dict_module_prefix(tmp_path, tiny_spec, make_state, reference_net, run_net):
    state = make_state(4)
    path = tmp_path / "dp.pt"
    torch.save(prefixed(state), path)
    write_json_config(tmp_path / "dp.json", tiny_spec)

    loaded = load_model(path)

    assert torch.equal(run_net(loaded.module), run_net(reference_net(state)))


def test_state_dict_prefix_duplicate(tmp_path, tiny_spec, make_state):
    state = make_state(4)
    mixed = {**state, "module.conv_in.weight": state["conv_in.weight"]}
    path = tmp_path / "mixed.pt"
    torch.save(mixed, path)
    write_json_config(tmp_path / "mixed.json", tiny_spec)

    with pytest.raises(CalibexportError, match="'conv_in.weight' both with and without"):
        load_model(path)


@pytest.mark.parametrize("entry", ["state_dict", "model", "ema"])
def test_wrapped_state_dict(tmp_path, tiny_spec, make_state, reference_net, run_net, entry):
    state = make_state(5)
    path = tmp_path / "wrapped.ckpt"
    torch.save({entry: prefixed(state), "epoch": 3}, path)
    write_json_config(tmp_path / "wrapped.json", tiny_spec)
    weights = "model" if entry == "model" else "ema"

    loaded = load_model(path, weights=weights)

    assert torch.equal(run_net(loaded.module), run_net(reference_net(state)))
    assert loaded.source["weights_loaded"] == ("unlabeled" if entry == "state_dict" else entry)


def test_wrapped_ema_and_model(tmp_path, tiny_spec, make_state, reference_net, run_net):
    model_state, ema_state = make_state(6), make_state(7)
    path = tmp_path / "both.pt"
    torch.save({"model": model_state, "ema": ema_state, "step": 10}, path)
    write_json_config(tmp_path / "both.json", tiny_spec)

    ema = load_model(path)
    model = load_model(path, weights="model")

    assert torch.equal(run_net(ema.module), run_net(reference_net(ema_state)))
    assert torch.equal(run_net(model.module), run_net(reference_net(model_state)))


def test_wrapped_model_only_rejects_ema(tmp_path, tiny_spec, make_state):
    path = tmp_path / "model_only.pt"
    torch.save({"model": make_state(6)}, path)
    write_json_config(tmp_path / "model_only.json", tiny_spec)

    with pytest.raises(CalibexportError, match=r"no 'ema' weights.*--weights model"):
        load_model(path)


def test_preset_config_option(tmp_path):
    spec = load_spec("digits")
    torch.manual_seed(0)
    from calibexport.models import DDPMUNet

    state = DDPMUNet(spec.unet).state_dict()
    path = tmp_path / "digits.pt"
    torch.save(state, path)

    loaded = load_model(path, config="digits")

    assert loaded.source["config"] == "digits"
    assert loaded.source["config_kind"] == "preset"
    assert loaded.weights_sha256 == weights_sha256(state)


def test_load_logs_summary(tmp_path, tiny_spec, make_state, caplog):
    state = make_state(0)
    path = tmp_path / "net.safetensors"
    save_native(path, state, tiny_spec)
    num_params = sum(t.numel() for t in state.values())

    with caplog.at_level(logging.INFO, logger="calibexport.models.loaders"):
        load_model(path)

    assert "Loaded native checkpoint" in caplog.text
    assert f"{num_params} parameters" in caplog.text
    assert "unlabeled weights" in caplog.text


# Weights digest ---------------------------------------------------------------------------------


def test_sha256_equal_across_formats(tmp_path, tiny_spec, make_state):
    state = make_state(8)
    config = str(write_json_config(tmp_path / "tiny.json", tiny_spec))
    save_native(tmp_path / "native.safetensors", state, tiny_spec)
    torch.save(ddim_list(make_state(9), state), tmp_path / "ckpt.pth")
    torch.save(prefixed(state), tmp_path / "plain.pt")
    torch.save({"ema": state}, tmp_path / "wrapped.pt")

    digests = {
        "native": load_model(tmp_path / "native.safetensors").weights_sha256,
        "ddim_list": load_model(tmp_path / "ckpt.pth", config=config).weights_sha256,
        "plain": load_model(tmp_path / "plain.pt", config=config).weights_sha256,
        "wrapped": load_model(tmp_path / "wrapped.pt", config=config).weights_sha256,
    }

    assert len(set(digests.values())) == 1, digests
    assert digests["native"] == weights_sha256(state)


def test_sha256_changes_with_weights(tmp_path, tiny_spec, make_state):
    state = make_state(8)
    changed = dict(state)
    changed["conv_out.bias"] = state["conv_out.bias"] + 1e-3
    config = str(write_json_config(tmp_path / "tiny.json", tiny_spec))
    torch.save(state, tmp_path / "a.pt")
    torch.save(changed, tmp_path / "b.pt")

    first = load_model(tmp_path / "a.pt", config=config).weights_sha256
    second = load_model(tmp_path / "b.pt", config=config).weights_sha256

    assert first != second


# Error paths ------------------------------------------------------------------------------------


def test_rejects_custom_class_pickle(tmp_path, tiny_spec, make_state):
    path = tmp_path / "custom.pt"
    torch.save({"state": make_state(0), "payload": CustomPayload()}, path)
    config = str(write_json_config(tmp_path / "tiny.json", tiny_spec))

    with pytest.raises(CalibexportError, match="needs arbitrary unpickling") as info:
        load_model(path, config=config)
    assert "CustomPayload" in str(info.value)
    assert "torch.save(model.state_dict(), path)" in str(info.value)
    assert "safetensors" in str(info.value)


def test_rejects_whole_module_pickle(tmp_path, tiny_spec, reference_net, make_state):
    path = tmp_path / "module.pt"
    torch.save(reference_net(make_state(0)), path)
    config = str(write_json_config(tmp_path / "tiny.json", tiny_spec))

    with pytest.raises(CalibexportError, match="can execute code, so calibexport will not"):
        load_model(path, config=config)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9])
def test_truncated_torch_file(tmp_path, tiny_spec, make_state, fraction):
    full = tmp_path / "full.pt"
    torch.save(make_state(0), full)
    data = full.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    config = str(write_json_config(tmp_path / "tiny.json", tiny_spec))

    with pytest.raises(CalibexportError, match=r"could not read checkpoint .*cut\.pt.*truncated"):
        load_model(path, config=config)


def test_truncated_safetensors(tmp_path, tiny_spec, make_state):
    path = tmp_path / "net.safetensors"
    save_native(path, make_state(0), tiny_spec)
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(CalibexportError, match=r"net\.safetensors.*truncated or corrupted"):
        load_model(path)


def test_truncated_json_config(tmp_path, tiny_spec, make_state):
    path = tmp_path / "net.safetensors"
    save_native(path, make_state(0), tiny_spec)
    config = tmp_path / "net.json"
    config.write_text(config.read_text()[:40])

    with pytest.raises(CalibexportError, match=r"could not parse JSON config .*net\.json"):
        load_model(path)


def test_broken_yaml_config(tmp_path, make_state):
    path = tmp_path / "weights.pt"
    torch.save(make_state(0), path)
    (tmp_path / "weights.yaml").write_text("model: {ch: 32, ch_mult: [1, 2\n")

    with pytest.raises(CalibexportError, match=r"could not parse YAML config .*weights\.yaml"):
        load_model(path)


def test_missing_config(tmp_path, make_state):
    path = tmp_path / "orphan.pt"
    torch.save(make_state(0), path)

    with pytest.raises(CalibexportError, match="no model config") as info:
        load_model(path)
    assert "--config" in str(info.value)
    assert "celeba64, cifar10, digits" in str(info.value)
    assert "orphan.json" in str(info.value)


def test_several_configs_beside(tmp_path, tiny_spec, make_state):
    path = tmp_path / "w.pt"
    torch.save(make_state(0), path)
    write_json_config(tmp_path / "w.json", tiny_spec)
    (tmp_path / "w.yml").write_text(yaml.safe_dump(ddim_yaml_dict(tiny_spec)))

    with pytest.raises(CalibexportError, match="several model configs.*--config"):
        load_model(path)


def test_unknown_config_option(tmp_path, make_state):
    path = tmp_path / "w.pt"
    torch.save(make_state(0), path)

    with pytest.raises(CalibexportError, match="'celeba' is neither a preset name"):
        load_model(path, config="celeba")


@pytest.mark.parametrize("weights", ["EMA", "raw", ""])
def test_invalid_weights_choice(tmp_path, tiny_spec, make_state, weights):
    path = tmp_path / "net.safetensors"
    save_native(path, make_state(0), tiny_spec)

    with pytest.raises(CalibexportError, match=f"invalid weights choice '{weights}'"):
        load_model(path, weights=weights)


def test_checkpoint_not_found(tmp_path):
    with pytest.raises(CalibexportError, match="checkpoint not found"):
        load_model(tmp_path / "absent.pth", config="digits")


def test_checkpoint_is_directory(tmp_path):
    with pytest.raises(CalibexportError, match="is a directory.*ckpt.pth"):
        load_model(tmp_path, config="digits")


def test_key_mismatch_missing_and_unexpected(tmp_path, tiny_spec, make_state):
    state = make_state(0)
    state["extra.weight"] = torch.zeros(3)
    del state["mid.attn_1.q.weight"]
    path = tmp_path / "w.pt"
    torch.save(state, path)
    config = str(write_json_config(tmp_path / "tiny.json", tiny_spec))

    with pytest.raises(CalibexportError, match="do not match the UNet") as info:
        load_model(path, config=config)
    message = str(info.value)
    assert "1 missing keys ['mid.attn_1.q.weight']" in message
    assert "1 unexpected keys ['extra.weight']" in message
    assert "--config" in message


def test_key_mismatch_lists_at_most_five(tmp_path, make_state):
    path = tmp_path / "w.pt"
    torch.save(make_state(0), path)

    # The digits preset has three resolution levels, so many of its keys are missing here.
    with pytest.raises(CalibexportError, match="do not match the UNet") as info:
        load_model(path, config="digits")
    count, listed = re.search(r"(\d+) missing keys \[(.*?)\]", str(info.value)).groups()
    assert int(count) > 5
    assert listed.count("'") == 10


def test_shape_mismatch(tmp_path, tiny_spec, make_state):
    state = make_state(0)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    wide = ModelSpec.from_dict(tiny_spec.to_dict())
    wide.unet.ch = 64
    config = str(write_json_config(tmp_path / "wide.json", wide))

    with pytest.raises(CalibexportError, match=r"conv_in.weight: checkpoint \(32, 1, 3, 3\) vs "
                                                r"model \(64, 1, 3, 3\)"):
        load_model(path, config=config)


def test_list_not_ddim_layout(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)

    with pytest.raises(CalibexportError, match="first element is int, not a state_dict"):
        load_model(path, config="digits")


def test_dict_without_weights(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)

    with pytest.raises(CalibexportError, match=r"not a state_dict.*top-level keys: \['epoch'"):
        load_model(path, config="digits")


def test_integer_tensor_rejected(tmp_path, tiny_spec, make_state):
    state = make_state(0)
    state["conv_out.bias"] = torch.zeros(1, dtype=torch.int64)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    config = str(write_json_config(tmp_path / "tiny.json", tiny_spec))

    with pytest.raises(CalibexportError, match="'conv_out.bias' has dtype torch.int64"):
        load_model(path, config=config)


def test_bayesian_logvar_dropped(tmp_path, tiny_spec, make_state, reference_net, run_net):
    state = make_state(0)
    path = tmp_path / "bayes.pt"
    torch.save({**state, "logvar": torch.zeros(1000)}, path)
    config = ddim_yaml_dict(tiny_spec)
    config["model"]["type"] = "bayesian"
    (tmp_path / "bayes.yml").write_text(yaml.safe_dump(config))

    loaded = load_model(path)

    assert torch.equal(run_net(loaded.module), run_net(reference_net(state)))
    assert loaded.weights_sha256 == weights_sha256(state)


def test_logvar_unexpected_for_simple_type(tmp_path, tiny_spec, make_state):
    path = tmp_path / "simple.pt"
    torch.save({**make_state(0), "logvar": torch.zeros(1000)}, path)
    (tmp_path / "simple.yml").write_text(yaml.safe_dump(ddim_yaml_dict(tiny_spec)))

    with pytest.raises(CalibexportError, match=r"1 unexpected keys \['logvar'\]"):
        load_model(path)


def test_single_element_list(tmp_path, tiny_spec, make_state, reference_net, run_net):
    state = make_state(1)
    path = tmp_path / "single.pth"
    torch.save([prefixed(state)], path)
    config = str(write_json_config(tmp_path / "tiny.json", tiny_spec))

    with pytest.raises(CalibexportError, match="its only element is the model state"):
        load_model(path, config=config)
    loaded = load_model(path, config=config, weights="model")
    assert torch.equal(run_net(loaded.module), run_net(reference_net(state)))


def test_source_reloads_same_network(tmp_path, tiny_spec, make_state):
    path = tmp_path / "ckpt.pth"
    torch.save(ddim_list(make_state(1), make_state(2)), path)
    write_json_config(tmp_path / "ckpt.json", tiny_spec)
    first = load_model(path, weights="model")

    source = first.source
    second = load_model(source["path"], config=source["config"], weights=source["weights"])

    assert second.weights_sha256 == first.weights_sha256
    assert second.source == first.source


def test_unlabeled_weights_warn_for_model(tmp_path, tiny_spec, make_state, caplog):
    path = tmp_path / "net.safetensors"
    save_native(path, make_state(0), tiny_spec)

    with caplog.at_level(logging.WARNING, logger="calibexport.models.loaders"):
        loaded = load_model(path, weights="model")

    assert "without an EMA/model label" in caplog.text
    assert loaded.source["weights_loaded"] == "unlabeled"
