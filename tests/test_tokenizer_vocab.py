import pytest

from dcustom.tokenizer_vocab import build_clip_tokenizer
from dcustom.tiny import TINY_WORDS


@pytest.mark.parametrize("source", ["tiny", "toyworld"])
def test_every_known_word_is_one_token(tmp_path, source):
    if source == "tiny":
        words = TINY_WORDS
    else:
        from dcustom.toyworld.grammar import vocabulary

        words = vocabulary()
    tokenizer = build_clip_tokenizer(words, tmp_path)
    split = {w: tokenizer.tokenize(w) for w in words if tokenizer.tokenize(w) != [w.lower() + "</w>"]}
    assert not split, f"words split into several tokens: {split}"


def test_unknown_text_still_tokenizes(tmp_path):
    tokenizer = build_clip_tokenizer(["red", "circle"], tmp_path)
    ids = tokenizer("a red circle xyz!").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "aredcirclexyz!"
