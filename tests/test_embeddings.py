"""Embedding files: what dcustom writes loads in diffusers' own `load_textual_inversion` and through
`load_adapter`; multi-vector tokens expand as diffusers expects; A1111 `.pt`, diffusers `.bin` and raw
tensors load with weights_only; every bad file gets one clear sentence and leaves the pipeline as it was."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from dcustom.adapters.embeddings import (
    EMBEDDINGS_NAME,
    embedding_summary,
    load_embedding,
    read_embedding,
    save_embedding,
    token_names,
    unload_embeddings,
)
from dcustom.adapters.load import load_adapter
from dcustom.errors import DcustomError
from dcustom.models import load_pipeline

DIM = 32  # tiny pipelines' text width (both SDXL encoders too)


def prompt_embeds(pipe, prompt: str):
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return torch.cat([embeds.flatten(), pooled.flatten()])
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


@pytest.fixture(scope="module")
def sd15():
    """One pipeline for checks that must not change it (bad files are refused before anything is loaded)."""
    return load_pipeline("tiny:sd15", device="cpu")


def test_sd15_file_loads_in_diffusers_and_dcustom_with_multi_vector_expansion(tmp_path):
    vectors = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))
    files = save_embedding(tmp_path, "<cat-toy>", {"text_encoder": vectors}, "sd1", {"dcustom.family": "sd1"})
    assert [f.name for f in files] == [EMBEDDINGS_NAME, "cat-toy.safetensors"]

    ours, theirs = load_pipeline("tiny:sd15", device="cpu"), load_pipeline("tiny:sd15", device="cpu")
    base_len = len(ours.tokenizer)
    assert load_adapter(ours, tmp_path) == "<cat-toy>"  # the run folder, as load_adapter sees it
    theirs.load_textual_inversion(str(tmp_path))  # diffusers' default file name in a folder
    for pipe in (ours, theirs):
        assert pipe.maybe_convert_prompt("a <cat-toy> dog", pipe.tokenizer) == "a <cat-toy> <cat-toy>_1 <cat-toy>_2 dog"
        ids = pipe.tokenizer.convert_tokens_to_ids(token_names("<cat-toy>", 3))
        assert ids == [base_len, base_len + 1, base_len + 2]
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], vectors)
    assert torch.equal(prompt_embeds(ours, "a photo of <cat-toy>"), prompt_embeds(theirs, "a photo of <cat-toy>"))

    # The A1111 copy (emb_params, file name = prompt word) holds the same vectors, in diffusers too.
    a1111 = tmp_path / "a1111" / "cat-toy.safetensors"
    assert torch.equal(read_embedding(a1111).vectors["*"], vectors)
    summary = embedding_summary(tmp_path)
    assert (summary["token"], summary["vectors"], summary["dims"], summary["family"]) == ("<cat-toy>", 3, {"text_encoder": DIM}, "sd1")
    assert summary["prompt_words"] == ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]
    other = load_pipeline("tiny:sd15", device="cpu")
    other.load_textual_inversion(str(a1111), token="<cat-toy>")
    assert torch.equal(prompt_embeds(other, "a photo of <cat-toy>"), prompt_embeds(ours, "a photo of <cat-toy>"))

    # Unloading gives the pipeline back its original tokenizer, so the same file loads again.
    unload_embeddings(ours)
    assert len(ours.tokenizer) == base_len and "<cat-toy>_1" not in ours.tokenizer.get_vocab()
    assert load_embedding(ours, tmp_path / EMBEDDINGS_NAME) == ["<cat-toy>"]


def test_sdxl_clip_l_clip_g_file_loads_in_diffusers_and_dcustom(tmp_path):
    g = torch.Generator().manual_seed(1)
    vectors = {"text_encoder": torch.randn(2, DIM, generator=g), "text_encoder_2": torch.randn(2, DIM, generator=g)}
    save_embedding(tmp_path, "<toy-subject>", vectors, "sdxl", {"dcustom.family": "sdxl"})
    raw = read_embedding(tmp_path / EMBEDDINGS_NAME)
    assert raw.token == "<toy-subject>" and set(raw.vectors) == {"text_encoder", "text_encoder_2"}

    ours, theirs = load_pipeline("tiny:sdxl", device="cpu"), load_pipeline("tiny:sdxl", device="cpu")
    assert load_adapter(ours, tmp_path / EMBEDDINGS_NAME) == "<toy-subject>"
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / EMBEDDINGS_NAME))  # diffusers' documented SDXL recipe: once per encoder
    theirs.load_textual_inversion(state["clip_l"], token="<toy-subject>", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(state["clip_g"], token="<toy-subject>", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    prompt = "a photo of <toy-subject> on a striped background"
    assert torch.equal(prompt_embeds(ours, prompt), prompt_embeds(theirs, prompt))
    assert not torch.equal(prompt_embeds(ours, prompt), prompt_embeds(load_pipeline("tiny:sdxl", device="cpu"), "a photo of toy"))
    for tok in (ours.tokenizer, ours.tokenizer_2):
        assert ours.maybe_convert_prompt(prompt, tok) == prompt.replace("<toy-subject>", "<toy-subject> <toy-subject>_1")


def test_pickled_embeddings_made_elsewhere_load_with_weights_only(sd15, tmp_path):
    t = torch.randn(2, DIM)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": "charturner", "step": 12,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}, tmp_path / "charturner.pt")  # A1111
    torch.save({"<diff-tok>": t[0]}, tmp_path / "learned_embeds.bin")  # diffusers .bin, one vector
    torch.save(t, tmp_path / "raw.pt")  # a bare tensor: the file name is the word
    a = read_embedding(tmp_path / "charturner.pt")
    assert a.token == "charturner" and torch.equal(a.vectors["*"], t)
    b = read_embedding(tmp_path / "learned_embeds.bin")
    assert b.token == "<diff-tok>" and b.vectors["*"].shape == (1, DIM)
    assert read_embedding(tmp_path / "raw.pt").token == "raw"
    assert read_embedding(tmp_path / "raw.pt", token="<mine>").token == "<mine>"

    pipe = load_pipeline("tiny:sd15", device="cpu")
    assert load_adapter(pipe, tmp_path / "charturner.pt") == "charturner"
    assert load_embedding(pipe, tmp_path / "learned_embeds.bin") == ["<diff-tok>"]
    assert pipe.maybe_convert_prompt("charturner", pipe.tokenizer) == "charturner charturner_1"


class _Payload:
    """A pickle that would create a file when unpickled: weights_only loading must refuse it unexecuted."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _bad_files(tmp, marker):
    def write(name, data: bytes):
        (tmp / name).write_bytes(data)
        return tmp / name

    def tensors(name, state, meta=None):
        save_file(state, str(tmp / name), metadata=meta)
        return tmp / name

    def pickled(name, obj):
        torch.save(obj, tmp / name)
        return tmp / name

    v = torch.randn(1, DIM)
    return {
        "empty safetensors": (write("empty.safetensors", b""), r"embedding '.*empty.safetensors' is empty \(0 bytes\); accepted: "),
        "empty pt": (write("empty.pt", b""), r"is empty \(0 bytes\)"),
        "corrupt safetensors": (write("junk.safetensors", os.urandom(64)), r"is not a valid safetensors file \(.*\); accepted: "),
        "corrupt pt": (write("junk.pt", b"PK\x03\x04 not really a zip"), r"is not a readable PyTorch file \(.*\); accepted: "),
        "code in pickle": (pickled("evil.pt", {"string_to_param": {"*": _Payload(str(marker))}}),
                           r"contains Python objects other than tensors \(.*\), which dcustom never unpickles"),
        "no tensor in pickle": (pickled("words.pt", {"name": "x", "notes": ["a", "b"]}),
                                r"holds no embedding \(found \['name', 'notes'\]\); accepted: "),
        "wrong dimension": (tensors("wide.safetensors", {"<wide>": torch.randn(2, 48)}),
                            r"vectors have dimension 48 but this pipeline's text_encoder expects 32; it was made for another model"),
        "sdxl on sd15": (tensors("xl.safetensors", {"clip_l": v, "clip_g": v.clone()}),
                         r"is an SDXL embedding \(clip_l \+ clip_g\) but this pipeline is Stable Diffusion 1.x"),
        "nan values": (tensors("nan.safetensors", {"<nan>": torch.full((1, DIM), float("nan"))}),
                       r"contains NaN or infinite values"),
        "integer tensor": (tensors("ints.safetensors", {"<ints>": torch.ones(1, DIM, dtype=torch.int64)}),
                           r"key '<ints>' is a torch.int64 tensor, not float vectors"),
        "word of the vocabulary": (tensors("dog.safetensors", {"dog": v}),
                                   r"token 'dog' already exists in this pipeline's tokenizer as a word of its vocabulary; "
                                   r"pass another token name"),
        "other family": (tensors("sd2.safetensors", {"<two>": v}, {"dcustom.family": "sd2"}),
                         r"was trained for Stable Diffusion 2.x \(sd2\) but this pipeline is Stable Diffusion 1.x \(sd1\)"),
        "unnamed": (tensors("learned_embeds.safetensors", {"emb_params": v}), r"does not name its token; pass the prompt word"),
    }


def test_every_bad_file_gets_one_clear_sentence_and_loads_nothing(sd15, tmp_path):
    marker = tmp_path / "payload-ran"
    vocab = len(sd15.tokenizer)
    rows = sd15.text_encoder.get_input_embeddings().weight.shape[0]
    for case, (path, message) in _bad_files(tmp_path, marker).items():
        for loader in (load_embedding, load_adapter):
            if loader is load_adapter and case == "corrupt safetensors":  # unrecognisable: load_adapter reads it as a LoRA
                message = r"is not a readable safetensors file \(.*\)\.$"
            with pytest.raises(DcustomError, match=message) as info:
                loader(sd15, path)
            assert str(info.value).count(". ") == 0 and str(info.value).endswith("."), (case, str(info.value))
        assert len(sd15.tokenizer) == vocab and sd15.text_encoder.get_input_embeddings().weight.shape[0] == rows, case
    assert not marker.exists()  # the pickled code never ran


def test_token_already_loaded_and_sd15_file_on_sdxl_are_refused(tmp_path):
    save_embedding(tmp_path / "one", "<once>", {"text_encoder": torch.randn(2, DIM)}, "sd1", {})
    pipe = load_pipeline("tiny:sd15", device="cpu")
    load_embedding(pipe, tmp_path / "one")
    with pytest.raises(DcustomError, match=r"token '<once>' already exists in this pipeline's tokenizer as an added token; "
                                           r"pass another token name \(token=\.\.\.\) or unload it first\."):
        load_embedding(pipe, tmp_path / "one")
    assert load_embedding(pipe, tmp_path / "one", token="<twice>") == ["<twice>"]  # renamed, it loads
    xl = load_pipeline("tiny:sdxl", device="cpu")
    with pytest.raises(DcustomError, match=r"holds vectors for one text encoder only, but Stable Diffusion XL has two; "
                                           r"accepted for SDXL: an embedding with clip_l and clip_g"):
        load_adapter(xl, tmp_path / "one")


def test_generate_cli_uses_an_embedding_beside_other_adapters_and_swaps_cleanly(cli, tmp_path):
    """`dcustom generate --adapter <embedding>` puts the word in the prompt's reach; changing the adapter list
    takes the tokens off again, so the same embedding loads a second time on the cached pipeline."""
    from dcustom.adapters.load import apply_adapters

    save_embedding(tmp_path / "emb", "<cat-toy>", {"text_encoder": 3 * torch.randn(2, DIM)}, "sd1", {})
    code, out, err = cli("generate", "--model", "tiny:sd15", "--prompt", "a photo of <cat-toy>", "--steps", "1",
                         "--width", "32", "--height", "32", "--seed", "0", "--device", "cpu",
                         "--adapter", tmp_path / "emb", "--output-dir", tmp_path / "out")
    assert code == 0, err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1

    pipe = load_pipeline("tiny:sd15", device="cpu")
    base_len = len(pipe.tokenizer)
    for specs in ([str(tmp_path / "emb")], [], [str(tmp_path / "emb")]):
        apply_adapters(pipe, specs)
        assert len(pipe.tokenizer) == base_len + 2 * len(specs)
