"""DoRA files x tools (issue 19, item 2).

peft: W' = m * (W + s*B@A) / ||W + s*B@A||_row. ComfyUI/Forge divide an output-axis dora_scale by the ORIGINAL
weight's row norm (+ float32 eps), A1111 and InvokeAI read dora_scale per input column, diffusers drops it. So:
  diffusers file          diffusers (use_dora)            loads and equals
  lora_kohya (DoRA)       ComfyUI/Forge                   equals: dora_scale = m * (||W|| + eps) / ||W + s*B@A||
                          diffusers, A1111, InvokeAI      refused (tests below show what they would compute)
  full_diff               ComfyUI, A1111, InvokeAI        equals (W + diff)
The UNet carries DoRA, the text encoders a plain LoRA (as dcustom trains them).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from interop_tools import (
    a1111_apply,
    adapted_pipeline,
    comfy_apply,
    comfy_model,
    comfy_reference,
    invoke_apply,
    invoke_reference,
    max_rel,
    merged_pipeline,
    merged_weights,
    text_encoder_names,
)
from safetensors.torch import load_file

from dcustom.adapters import files
from dcustom.adapters.kohya import diffusers_to_kohya

TOL = 1e-5
KINDS = ["sd15", "sdxl"]


@pytest.fixture(scope="module", params=KINDS)
def case(request, tmp_path_factory):
    kind = request.param
    family = "sdxl" if kind == "sdxl" else "sd1"
    base, pipe = adapted_pipeline(kind, "dora")
    folder = tmp_path_factory.mktemp(f"dora-{kind}")
    meta = files.dcustom_metadata("lora", f"tiny:{kind}", family, None, "diffusers")
    tes = text_encoder_names(pipe)
    diffusers_path = files.save_diffusers_lora(folder, pipe, tes, meta)
    kohya_path = files.save_kohya_lora(folder, pipe, family, tes, meta)
    full_path = files.save_full_diff(folder, pipe, family, meta)
    lycoris_path = diffusers_to_kohya(diffusers_path, folder / "lycoris_form.safetensors")  # peft's m as it is
    merged = merged_weights(pipe)
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(str(diffusers_path)))
    return SimpleNamespace(kind=kind, family=family, base=base, merged=merged, diffusers_path=diffusers_path,
                           kohya_path=kohya_path, kohya=load_file(str(kohya_path)), full=load_file(str(full_path)),
                           lycoris=load_file(str(lycoris_path)), meta=files.read_metadata(kohya_path))


def worst(computed: dict, reference: dict) -> float:
    assert computed and set(computed) == set(reference), sorted(set(computed) ^ set(reference))[:4]
    return max(max_rel(computed[k], reference[k]) for k in reference)


def off_by_of_change(computed: dict, reference: dict, before: dict) -> float:
    """Worst module's max |tool - peft| as a fraction of its max |peft - base| (how far off, in units of the change)."""
    return max((computed[k].float() - reference[k].float()).abs().max().item()
               / (reference[k].float() - before[k].float()).abs().max().item() for k in reference)


def test_diffusers_t5_loads_the_diffusers_file_and_equals(case):
    pipe = copy.deepcopy(case.base)
    pipe.load_lora_weights(str(case.diffusers_path.parent), weight_name=case.diffusers_path.name, adapter_name="x")
    assert pipe.unet.peft_config["x"].use_dora
    got = merged_weights(pipe, "x")
    for component, modules in case.merged.items():
        assert worst(got[component], modules) < TOL, component


def test_comfyui_kohya_dora_file_loads_and_equals(case):
    assert case.meta["dcustom.dora_scale"] == "comfyui"
    patched, unloaded, patches = comfy_apply(case.base, case.kohya)
    assert not unloaded
    assert sum(p[4] is not None for p in patches.values()) > 0  # the DoRA modules went through weight_decompose
    assert worst(patched, comfy_reference(case.base, case.merged)) < TOL


def test_comfyui_with_peft_magnitudes_is_off(case):
    """Why the kohya file carries ComfyUI's form: with peft's own m, ComfyUI is off by a large part of the change."""
    patched, _, _ = comfy_apply(case.base, case.lycoris)
    reference = comfy_reference(case.base, case.merged)
    before = comfy_model(case.base)
    off = off_by_of_change(patched, reference, before)
    print(f"ComfyUI with peft's DoRA magnitudes ({case.kind}): worst module off by {off:.1%} of its change")
    assert off > 0.01


def test_dcustom_reads_the_comfyui_form_exactly(case):
    from dcustom.adapters.load import load_adapter

    pipe = copy.deepcopy(case.base)
    name = load_adapter(pipe, case.kohya_path)
    got = merged_weights(pipe, name)
    for component, modules in case.merged.items():
        assert worst(got[component], modules) < TOL, component


def test_diffusers_drops_dora_scale_from_the_kohya_file(case):
    """Refused for diffusers: its kohya reader loads a plain LoRA (dora_scale dropped, logged at INFO)."""
    pipe = copy.deepcopy(case.base)
    pipe.load_lora_weights(str(case.kohya_path.parent), weight_name=case.kohya_path.name, adapter_name="x")
    assert not pipe.unet.peft_config["x"].use_dora
    assert worst(merged_weights(pipe, "x")["unet"], case.merged["unet"]) > 1e-3


def ldm_before_and_changed(case):
    from dcustom.single_file import single_file_state

    before = single_file_state(case.base)
    after = single_file_state(merged_pipeline(case.base, case.merged))
    return before, {k: v for k, v in after.items() if not torch.equal(v, before[k])}


def test_a1111_reads_dora_on_the_input_axis_so_the_kohya_file_is_refused(case):
    before, changed = ldm_before_and_changed(case)
    patched, failed = a1111_apply(before, case.kohya, case.family)
    assert not failed
    dora = [k for k in changed if "diffusion_model" in k]
    assert max(max_rel(patched[k], changed[k]) for k in dora) > 1e-3


def test_a1111_full_diff_loads_and_equals(case):
    before, changed = ldm_before_and_changed(case)
    patched, failed = a1111_apply(before, case.full, case.family)
    assert not failed and worst(patched, changed) < TOL


def test_invokeai_reads_dora_on_the_input_axis_so_the_kohya_file_is_refused(case):
    patched, missing = invoke_apply(case.base, case.family, case.kohya)
    reference = invoke_reference(case.base, case.family, case.merged)
    assert not missing
    assert max(max_rel(patched[k], reference[k]) for k in reference if k[0] == "lora_unet_") > 1e-3


def test_invokeai_full_diff_loads_and_equals(case):
    patched, missing = invoke_apply(case.base, case.family, case.full)
    assert not missing and worst(patched, invoke_reference(case.base, case.family, case.merged)) < TOL


def test_comfyui_full_diff_loads_and_equals(case):
    patched, unloaded, _ = comfy_apply(case.base, case.full)
    assert not unloaded and worst(patched, comfy_reference(case.base, case.merged)) < TOL
