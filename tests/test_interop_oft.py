"""OFT / BOFT files x tools (issue 19, item 3).

peft's OFT rotates the INPUT side of each weight (W' = W @ R^T, block-diagonal R); LyCORIS' `oft_blocks`, the
only OFT layout ComfyUI reads, rotate blocks of the OUTPUT rows (W' = R W). A rotation of the output rows cannot
stand for a rotation of the inputs, so no `oft_blocks` file computes peft's weights. The exact export is the
LyCORIS "full" layout (`<module>.diff` = W' - W), which ComfyUI/Forge, A1111 and InvokeAI add as it is; the
SVD-extracted LoRA stays for tools that read only LoRA, with its total and worst-module error in its header.
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
    invoke_apply,
    invoke_probe,
    invoke_reference,
    max_rel,
    merged_pipeline,
    merged_weights,
    probe_shaped_pipeline,
)
from safetensors.torch import load_file

from dcustom.adapters import files

TOL = 1e-5
CASES = [("sd15", "oft"), ("sdxl", "oft"), ("sd15", "boft")]
RANK = 4  # below the layers' widths (32/64), so the extracted LoRA is a real approximation


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{m}" for k, m in CASES])
def case(request, tmp_path_factory):
    kind, method = request.param
    family = "sdxl" if kind == "sdxl" else "sd1"
    base, pipe = adapted_pipeline(kind, method)
    folder = tmp_path_factory.mktemp(f"{method}-{kind}")
    meta = files.dcustom_metadata(method, f"tiny:{kind}", family, None, "peft")
    peft_folder = files.save_peft_folder(folder / "unet", pipe.unet, meta)
    full_path = files.save_full_diff(folder, pipe, family, meta)
    extracted_path, total = files.save_extracted_lora(folder, pipe.unet, RANK, meta)
    return SimpleNamespace(kind=kind, method=method, family=family, base=base, merged=merged_weights(pipe),
                           peft_folder=peft_folder, full_path=full_path, full=load_file(str(full_path)),
                           extracted=load_file(str(extracted_path)), extracted_meta=files.read_metadata(extracted_path),
                           total=total)


def worst(computed: dict, reference: dict) -> float:
    assert computed and set(computed) == set(reference), sorted(set(computed) ^ set(reference))[:4]
    return max(max_rel(computed[k], reference[k]) for k in reference)


def test_diffusers_t5_loads_the_peft_folder_with_peft_and_equals(case):
    """The peft folder is for peft: diffusers' unet.add_adapter + peft's set_peft_model_state_dict."""
    from peft import PeftConfig, set_peft_model_state_dict

    from dcustom.adapters.boft_kernel import ensure_boft_kernel

    ensure_boft_kernel()
    pipe = copy.deepcopy(case.base)
    pipe.unet.add_adapter(PeftConfig.from_pretrained(str(case.peft_folder)), adapter_name="x")
    result = set_peft_model_state_dict(pipe.unet, load_file(str(case.peft_folder / "adapter_model.safetensors")),
                                       adapter_name="x")
    assert not getattr(result, "unexpected_keys", None)
    assert worst(merged_weights(pipe, "x")["unet"], case.merged["unet"]) < TOL


def test_comfyui_a1111_invokeai_read_no_key_of_the_peft_folder(case):
    from dcustom.single_file import single_file_state

    peft = load_file(str(case.peft_folder / "adapter_model.safetensors"))
    patched, unloaded, _ = comfy_apply(case.base, peft)
    assert not patched and unloaded == set(peft)
    patched, failed = a1111_apply(single_file_state(case.base), peft, case.family)
    assert not patched and set(failed) == set(peft)
    with pytest.raises(NotRecognised, match="does not match LyCORIS LoRA heuristics"):
        invoke_probe(peft)


def test_comfyui_full_diff_loads_and_equals(case):
    patched, unloaded, patches = comfy_apply(case.base, case.full)
    assert not unloaded and all(p[0] == "diff" for p in patches.values())
    assert worst(patched, comfy_reference(case.base, case.merged)) < TOL


def test_a1111_full_diff_loads_and_equals(case):
    from dcustom.single_file import single_file_state

    before = single_file_state(case.base)
    after = single_file_state(merged_pipeline(case.base, case.merged))
    changed = {k: v for k, v in after.items() if not torch.equal(v, before[k])}
    patched, failed = a1111_apply(before, case.full, case.family)
    assert not failed and worst(patched, changed) < TOL


def test_invokeai_full_diff_loads_and_equals(case):
    patched, missing = invoke_apply(case.base, case.family, case.full)
    assert not missing and worst(patched, invoke_reference(case.base, case.family, case.merged)) < TOL


def test_diffusers_refuses_the_full_diff(case):
    pipe = copy.deepcopy(case.base)
    with pytest.raises(ValueError, match="have not been correctly renamed"):
        pipe.load_lora_weights(str(case.full_path.parent), weight_name=case.full_path.name)


def extracted_reference(case) -> dict:
    """What the extracted LoRA stands for in every tool: base + up @ down (alpha = rank: scale 1)."""
    unet = case.base.unet.state_dict()
    out = {}
    for module in case.merged["unet"]:
        key = files.kohya_module_name("lora_unet", module)
        up, down = case.extracted[f"{key}.lora_up.weight"], case.extracted[f"{key}.lora_down.weight"]
        assert case.extracted[f"{key}.alpha"].item() == down.shape[0]
        out[module] = unet[f"{module}.weight"] + up @ down
    return out


def test_extracted_lora_is_approximate_everywhere_and_records_its_worst_module(case):
    """ComfyUI, A1111, InvokeAI and diffusers all compute the extracted approximation; the header records the
    total error and the worst module's own error, which is what a user of those tools gets on that module."""
    approx = {"unet": extracted_reference(case)}
    comfy, unloaded, _ = comfy_apply(case.base, case.extracted)
    assert not unloaded and worst(comfy, comfy_reference(case.base, approx)) < TOL
    invoke, missing = invoke_apply(case.base, case.family, case.extracted)
    assert not missing and worst(invoke, invoke_reference(case.base, case.family, approx)) < TOL
    pipe = copy.deepcopy(case.base)
    pipe.load_lora_weights(str(case.full_path.parent), weight_name=files.EXTRACTED_LORA_NAME, adapter_name="x")
    assert worst(merged_weights(pipe, "x")["unet"], approx["unet"]) < TOL
    base = case.base.unet.state_dict()
    errors = {m: ((approx["unet"][m] - case.merged["unet"][m]).norm() / (case.merged["unet"][m] - base[f"{m}.weight"]).norm()).item()
              for m in case.merged["unet"]}
    worst_module = max(errors, key=errors.get)
    meta = case.extracted_meta
    assert meta["dcustom.extraction_worst_module"] == worst_module
    assert abs(float(meta["dcustom.extraction_worst_rel_error"]) - errors[worst_module]) < 1e-4
    assert abs(float(meta["dcustom.extraction_rel_error"]) - case.total) < 1e-4 and errors[worst_module] >= case.total
    print(f"{case.kind} {case.method} rank-{RANK} extraction: total {case.total:.3f}, "
          f"worst module {worst_module} {errors[worst_module]:.3f}")


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_invokeai_probe_recognises_the_full_diff_and_extracted_files(kind, tmp_path):
    _, pipe = adapted_pipeline(kind, "oft", pipe_factory=lambda: probe_shaped_pipeline(kind))
    family = "sdxl" if kind == "sdxl" else "sd1"
    full = files.save_full_diff(tmp_path, pipe, family, {})
    extracted, _ = files.save_extracted_lora(tmp_path, pipe.unet, RANK, {})
    expected = "sdxl" if kind == "sdxl" else "sd-1"
    assert invoke_probe(load_file(str(full))) == expected and invoke_probe(load_file(str(extracted))) == expected
    files.save_peft_folder(tmp_path / "unet", pipe.unet, {})
    with pytest.raises(NotRecognised):
        invoke_probe(load_file(str(tmp_path / "unet" / "adapter_model.safetensors")))
