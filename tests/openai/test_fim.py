"""Fill-in-the-middle: `suffix` on /v1/completions, as IDE plugins send it.

The embedded code model was trained with FIM examples (tools/train_code_model.py --fim-rate);
tools/eval_code_fim.py cut the cases below from standard-library files it never trained on (a
top-level function with one line of its body taken out) and recorded transformers' greedy
middles. Switchyard must write the same middles as transformers wherever transformers' choice
was not a near-tie, and middles that make the function parse again as often as the model does
(tools/code-model/fim.json: 17 of these 35, 49%; a floor of 40% leaves room for the near-ties).
"""

import ast
import json

import openai
import pytest
from conftest import FIXTURES, Server

FIM = json.loads((FIXTURES / "code-model-fim" / "cases.json").read_text())
# Below this top-1/top-2 log-probability margin somewhere in transformers' middle, float
# rounding may pick the other token; the text is compared only above it.
CLEAR_MARGIN = 0.05
# Most filled functions must parse.
PARSE_FLOOR = 0.5


@pytest.fixture(scope="module")
def code_model(tmp_path_factory):
    server = Server(["up", "--expert-nodes", "2", "--http", "127.0.0.1:0", "--data-dir", str(tmp_path_factory.mktemp("up"))])
    yield server
    server.stop()


def parses(code):
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        return False


def test_the_embedded_model_fills_the_middle_of_held_out_functions(code_model):
    client = code_model.client()
    parsed = exact = same = compared = 0
    for case in FIM["cases"]:
        r = client.completions.create(
            model="switchyard-code-moe",
            prompt=case["prefix"],
            suffix=case["suffix"],
            max_tokens=FIM["max_new_tokens"],
            temperature=0,
        )
        middle = r.choices[0].text
        parsed += parses(case["prefix"] + middle + case["suffix"])
        exact += middle.rstrip() == case["middle"].rstrip()
        if case["min_margin"] >= CLEAR_MARGIN:
            compared += 1
            if middle == case["expected"]:
                same += 1
            else:
                print(f"differs from transformers: {middle!r} != {case['expected']!r}")
    n = len(FIM["cases"])
    print(f"FIM: {parsed}/{n} parse, {exact}/{n} exact lines, {same}/{compared} as transformers")
    assert parsed > PARSE_FLOOR * n, f"only {parsed} of {n} filled functions parse"
    assert compared >= n / 4 and same == compared, f"{same} of {compared} clear cases match transformers"


def test_a_streamed_fim_completion_is_the_same_text(code_model):
    client = code_model.client()
    case = FIM["cases"][0]
    args = dict(model="switchyard-code-moe", prompt=case["prefix"], suffix=case["suffix"], max_tokens=24, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args) if c.choices)
    assert streamed == whole


def test_an_empty_suffix_is_the_end_of_the_file(code_model):
    # The function's last line: the model sees that nothing follows and ends the middle there.
    client = code_model.client()
    case = next(c for c in FIM["cases"] if c["suffix"] == "" and c["finished"])
    r = client.completions.create(model="switchyard-code-moe", prompt=case["prefix"], suffix="", max_tokens=FIM["max_new_tokens"], temperature=0)
    assert r.choices[0].finish_reason == "stop"
    plain = client.completions.create(model="switchyard-code-moe", prompt=case["prefix"], max_tokens=FIM["max_new_tokens"], temperature=0)
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens + 3, "the three FIM tokens"


def test_fim_requests_it_cannot_build_are_refused_naming_suffix(code_model, qwen):
    code = code_model.client()
    for bad in (
        dict(prompt=[5, 6, 7], suffix="x = 1\n"),  # token ids: no text to put the suffix after
        dict(prompt="def f():\n", suffix="    return 1\n", echo=True),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            code.completions.create(model="switchyard-code-moe", max_tokens=4, **bad)
        assert e.value.body["param"] == "suffix", e.value.body
    # A model without FIM tokens: a 400 naming `suffix`, not a completion that ignores it.
    model = qwen.client().models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        qwen.client().completions.create(model=model, prompt="def f():\n", suffix="    return 1\n", max_tokens=4)
    assert e.value.body["param"] == "suffix"
    assert "fill-in-the-middle" in e.value.body["message"]
    # An empty suffix on such a model means what a plain completion means: nothing after it.
    plain = qwen.client().completions.create(model=model, prompt="def f():", max_tokens=4, temperature=0)
    empty = qwen.client().completions.create(model=model, prompt="def f():", suffix="", max_tokens=4, temperature=0)
    assert empty.choices[0].text == plain.choices[0].text
