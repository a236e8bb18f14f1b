"""Think formats: delimiters, rendering and splitting, and their round trip through the tiny tokenizer."""

import pytest

from budgetthink.errors import UserError
from budgetthink.formats import FORMATS, get_format
from budgetthink.tiny import build_tokenizer


def test_delimiters_as_specified():
    assert (FORMATS["tinyzero"].think_open, FORMATS["tinyzero"].think_close) == ("<think>", "</think>")
    s1 = FORMATS["s1"]
    assert s1.prompt("Q\n") + "trace" + s1.think_close + s1.answer_prefix + "42" == \
        "Q\n<|im_start|>think\ntrace\n<|im_start|>answer\nAnswer: 42"
    assert FORMATS["r1"].think_open == "<think>\n"


@pytest.mark.parametrize("name", list(FORMATS))
def test_completion_split_round_trip(name):
    fmt = get_format(name)
    text = fmt.completion("try 1+2=3 ==3", "<answer>1+2</answer>")
    assert fmt.split(text) == ("try 1+2=3 ==3", "<answer>1+2</answer>")
    assert fmt.split("never closed") == ("never closed", "")


@pytest.mark.parametrize("name", list(FORMATS))
def test_budget_phrase_survives_tokenizer(name):
    fmt, tok = get_format(name), build_tokenizer()
    text = fmt.prompt("3 5 7 -> 22\n", budget=64)
    assert "64" in fmt.budget_phrase(64) and text.endswith(fmt.think_open)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_prompt_without_template():
    text = get_format("tinyzero").chat_prompt([{"role": "user", "content": "hi"}])
    assert text == "User: hi\nAssistant: <think>"


def test_unknown_format():
    with pytest.raises(UserError, match="tinyzero, s1, r1"):
        get_format("nope")
