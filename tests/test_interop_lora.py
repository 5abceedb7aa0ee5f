"""LoRA files x tools (issue 19): every cell of the README's interop table for the two LoRA files.

Each test applies one tool's key mapping and merge formula (tests/interop_tools.py, written from the tools'
loaders) to the file dcustom writes and compares the weights it computes with the weights peft computes for the
trained adapter. alpha != rank on the UNet (3/4) and on the text encoders (5/2), so a tool or a writer that
drops the true alpha fails. SD1.x and SDXL (two text encoders, OpenCLIP-layout second encoder in A1111).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from interop_tools import (
    NotRecognised,
    a1111_apply,
    adapted_pipeline,
    comfy_apply,
    comfy_reference,
    diffusers_text_encoder_modules,
    invoke_apply,
    invoke_probe,
    invoke_reference,
    max_rel,
    merged_pipeline,
    merged_weights,
    text_encoder_names,
    transformers4_module_names,
)
from safetensors.torch import load_file

from dcustom.adapters import files

TOL = 1e-5
KINDS = ["sd15", "sdxl"]


def family_of_kind(kind: str) -> str:
    return "sdxl" if kind == "sdxl" else "sd1"


def write_lora_files(pipe, folder, kind):
    family = family_of_kind(kind)
    meta = files.dcustom_metadata("lora", f"tiny:{kind}", family, None, "diffusers")
    tes = text_encoder_names(pipe)
    return (files.save_diffusers_lora(folder, pipe, tes, meta),
            files.save_kohya_lora(folder, pipe, family, tes, {**meta, "dcustom.format": "kohya"}))


@pytest.fixture(scope="module", params=KINDS)
def case(request, tmp_path_factory):
    kind = request.param
    base, pipe = adapted_pipeline(kind, "lora")
    folder = tmp_path_factory.mktemp(f"lora-{kind}")
    diffusers_path, kohya_path = write_lora_files(pipe, folder, kind)
    merged = merged_weights(pipe)
    assert set(merged) == {"unet", *text_encoder_names(pipe)}
    return SimpleNamespace(kind=kind, family=family_of_kind(kind), base=base, merged=merged, folder=folder,
                           diffusers_path=diffusers_path, kohya_path=kohya_path,
                           diffusers=load_file(str(diffusers_path)), kohya=load_file(str(kohya_path)))


def assert_same(computed: dict, reference: dict, what: str):
    assert computed, what
    assert set(computed) == set(reference), (what, sorted(set(computed) ^ set(reference))[:4])
    worst = max(max_rel(computed[k], reference[k]) for k in reference)
    assert worst < TOL, (what, worst)
    return worst


# --- diffusers with transformers 5 (installed here) -------------------------------------------------------------
def loaded_by_diffusers(case, path):
    pipe = copy.deepcopy(case.base)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    return merged_weights(pipe, "x")


@pytest.mark.parametrize("which", ["diffusers_path", "kohya_path"])
def test_diffusers_t5_loads_and_equals(case, which):
    got = loaded_by_diffusers(case, getattr(case, which))
    for component, modules in case.merged.items():
        assert_same(got[component], modules, f"{which} {component}")


# --- diffusers with transformers 4 (its CLIPTextModel keeps the text_model. level) -------------------------------
def test_diffusers_file_names_transformers4_text_encoder_modules(case):
    """Every text-encoder module the diffusers file names exists in transformers 4's CLIPTextModel; the form
    dcustom used to write (`text_encoder.encoder.layers.*`) does not (the issue-19 crash), and dcustom reads both."""
    pipe = copy.deepcopy(case.base)
    for component in text_encoder_names(pipe):
        asked = diffusers_text_encoder_modules(case.diffusers, component)
        assert asked and asked <= transformers4_module_names(getattr(pipe, component)), component
        assert all(m.startswith("text_model.encoder.layers.") for m in asked)
    flat = {k.replace("text_encoder.text_model.", "text_encoder.", 1): v for k, v in case.diffusers.items()}
    assert not diffusers_text_encoder_modules(flat, "text_encoder") <= transformers4_module_names(pipe.text_encoder)
    assert files.canonical_diffusers_lora(flat) == case.diffusers  # dcustom's loader reads the old form


def test_old_flat_text_encoder_file_still_loads_in_dcustom(case, tmp_path):
    from dcustom.adapters.load import load_adapter

    flat = {k.replace("text_encoder.text_model.", "text_encoder.", 1): v for k, v in case.diffusers.items()}
    files.save_tensors(flat, tmp_path / "old.safetensors", files.read_metadata(case.diffusers_path))
    pipe = copy.deepcopy(case.base)
    name = load_adapter(pipe, tmp_path / "old.safetensors")
    got = merged_weights(pipe, name)
    for component, modules in case.merged.items():
        assert_same(got[component], modules, component)


# --- ComfyUI (and Forge) ------------------------------------------------------------------------------------------
def test_comfyui_kohya_file_loads_and_equals(case):
    patched, unloaded, _ = comfy_apply(case.base, case.kohya)
    assert not unloaded, sorted(unloaded)[:4]  # ComfyUI warns "lora key not loaded" for each of these
    assert_same(patched, comfy_reference(case.base, case.merged), "comfyui kohya")


def test_comfyui_maps_no_unet_key_of_the_diffusers_file(case):
    """Refused with a reason: ComfyUI maps diffusers UNet LoRA keys only in the old attention-processor form."""
    patched, unloaded, _ = comfy_apply(case.base, case.diffusers)
    assert not any(k.startswith("diffusion_model.") for k in patched)
    assert {k for k in unloaded if k.startswith("unet.")} == {k for k in case.diffusers if k.startswith("unet.")}


# --- A1111 --------------------------------------------------------------------------------------------------------
def a1111_reference(case):
    from dcustom.single_file import single_file_state

    before = single_file_state(case.base)
    after = single_file_state(merged_pipeline(case.base, case.merged))
    return before, {k: v for k, v in after.items() if not torch.equal(v, before[k])}


def test_a1111_kohya_file_loads_and_equals(case):
    before, changed = a1111_reference(case)
    patched, failed = a1111_apply(before, case.kohya, case.family)
    assert not failed, sorted(failed.items())[:4]
    assert_same(patched, changed, "a1111 kohya")
    if case.family == "sdxl":  # the OpenCLIP encoder's q/k/v live in one in_proj_weight
        assert any(k.endswith(".attn.in_proj_weight") for k in patched)


def test_a1111_matches_no_key_of_the_diffusers_file(case):
    before, _ = a1111_reference(case)
    patched, failed = a1111_apply(before, case.diffusers, case.family)
    assert not patched and set(failed) == set(case.diffusers)


# --- InvokeAI -----------------------------------------------------------------------------------------------------
def test_invokeai_kohya_file_loads_and_equals(case):
    patched, missing = invoke_apply(case.base, case.family, case.kohya)
    assert not missing, missing[:4]
    assert_same(patched, invoke_reference(case.base, case.family, case.merged), "invokeai kohya")


@pytest.mark.parametrize("kind", KINDS)
def test_invokeai_probe_recognises_the_kohya_file_not_the_diffusers_file(kind, tmp_path):
    """The probe reads the base from the token width (768 SD1, 2048 SDXL): real widths, tiny everything else."""
    from interop_tools import probe_shaped_pipeline

    _, pipe = adapted_pipeline(kind, "lora", pipe_factory=lambda: probe_shaped_pipeline(kind))
    diffusers_path, kohya_path = write_lora_files(pipe, tmp_path, kind)
    assert invoke_probe(load_file(str(kohya_path))) == ("sdxl" if kind == "sdxl" else "sd-1")
    with pytest.raises(NotRecognised):  # no lora_unet_/lora_te prefix: not a LyCORIS LoRA, no token width
        invoke_probe(load_file(str(diffusers_path)))


def test_diffusers_file_metadata_is_portable_to_older_peft(case):
    """diffusers builds LoraConfig(**metadata): fields only a recent peft knows made the file fail to load with
    peft 0.17 (common with transformers 4: 'LoraConfig class could not be instantiated')."""
    import json

    metadata = json.loads(files.read_metadata(case.diffusers_path)["lora_adapter_metadata"])
    assert metadata and {k.split(".", 1)[1] for k in metadata} <= set(files.PORTABLE_LORA_FIELDS)
    assert metadata["unet.lora_alpha"] == 3.0 and metadata["text_encoder.lora_alpha"] == 5.0
