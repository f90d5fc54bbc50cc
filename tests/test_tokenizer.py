"""Tokenizer: round trip and incremental deltas that are whole characters."""
import pytest

from workers.models.tiny import write_random_checkpoint
from workers.tokenizer import TextStream, Tokenizer

TEXT = "Unicode: café, naïve, 東京, München 🙂 and 🚀 plus 日本語のテキスト."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = write_random_checkpoint(tmp_path_factory.mktemp("tok") / "m", vocab_size=300)
    return Tokenizer(d)


def test_round_trip(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and all(0 <= i < tok.vocab_size for i in ids)


def test_incremental_deltas_are_whole_characters_and_add_up(tok):
    prompt = tok.encode("The quick brown fox")
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 3  # multi-byte characters really are split across tokens
    det = tok.detokenizer(prompt)
    deltas = [det.add(t, final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)  # some tokens had to wait for the rest of their character


def test_final_flush_of_an_incomplete_character(tok):
    ids = tok.encode("🙂")
    det = tok.detokenizer([])
    out = "".join(det.add(t, final=(i == len(ids) - 2)) for i, t in enumerate(ids[:-1]))
    assert len(ids) > 1 and out.endswith("\ufffd")  # flushed, marked as incomplete


def test_text_stream_cuts_at_a_stop_string_and_never_hands_out_its_start(tok):
    prompt = tok.encode("The quick brown fox")
    ids = tok.encode(" jumps over the lazy dog", add_special_tokens=False)
    assert tok.decode(ids) == " jumps over the lazy dog"
    ts, outs, stop = TextStream(tok, prompt, stops=["lazy", "cat"]), [], None
    for i, t in enumerate(ids):
        text, stop = ts.add([t], final=i == len(ids) - 1)
        outs.append(text)
        assert not "".join(outs).endswith(("l", "la", "laz", "c", "ca"))  # a possible stop start waits
        if stop:
            break
    assert stop == "lazy" and "".join(outs) == " jumps over the " == ts.text
    plain = TextStream(tok, prompt)
    assert "".join(plain.add([t], final=i == len(ids) - 1)[0] for i, t in enumerate(ids)) == " jumps over the lazy dog"
