"""Structured output and tool calling against a real `up` (router + 2 expert nodes), with the
official `openai` client and LangChain. The fixtures are random models: unconstrained, their
text is noise, so every answer that validates does so because of the grammar."""

import asyncio
import json
from typing import Literal

import jsonschema
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from conftest import FIXTURES, up

MODEL = "qwen3_moe"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["bug", "feature", "chore"]},
        "owner": {
            "type": "object",
            "properties": {"login": {"type": "string", "maxLength": 8}, "admin": {"type": "boolean"}},
            "required": ["login", "admin"],
            "additionalProperties": False,
        },
        "labels": {"type": "array", "items": {"enum": ["ui", "api", "docs"]}, "maxItems": 3},
        "votes": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["name", "kind", "owner", "labels", "votes"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather at a place.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "maxLength": 10},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def chat(client, **kw):
    return client.chat.completions.create(model=kw.pop("model", MODEL), **kw)


def test_json_schema_answers_validate_where_unconstrained_ones_do_not_parse(qwen):
    c = qwen.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "issue", "schema": SCHEMA, "strict": True}}
    r = chat(c, messages=ASK, n=5, temperature=1, seed=11, max_tokens=300, response_format=fmt)
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert len({ch.message.content for ch in r.choices}) > 1, "sampled answers differ"
    # The same request without the schema: noise, not JSON.
    free = chat(c, messages=ASK, n=5, temperature=1, seed=11, max_tokens=40)
    for choice in free.choices:
        with pytest.raises(ValueError):
            json.loads(choice.message.content)


def test_json_object_answers_are_objects_on_both_endpoints(qwen):
    c = qwen.client()
    r = chat(c, messages=ASK, n=5, temperature=1, seed=3, max_tokens=900, response_format={"type": "json_object"})
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        assert isinstance(json.loads(choice.message.content), dict)
    # vLLM's structured_outputs on /v1/completions, and guided_json.
    r = c.completions.create(
        model=MODEL, prompt="x", n=5, temperature=1, seed=5, max_tokens=300,
        extra_body={"structured_outputs": {"json": SCHEMA}},
    )
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    r = c.completions.create(
        model=MODEL, prompt="x", n=2, temperature=1, seed=6, max_tokens=300, extra_body={"guided_json": SCHEMA}
    )
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)


def test_guided_choice_and_regex_outputs_match(qwen):
    c = qwen.client()
    options = ["yes", "no", "needs more info"]
    r = c.completions.create(
        model=MODEL, prompt="Ship it?", n=8, temperature=1, seed=1, max_tokens=20, extra_body={"guided_choice": options}
    )
    assert all(ch.text in options for ch in r.choices), [ch.text for ch in r.choices]
    assert all(ch.finish_reason == "stop" for ch in r.choices)
    pattern = r"[A-Z]{2,3}-[0-9]{1,4}"
    r = c.completions.create(
        model=MODEL, prompt="Ticket:", n=5, temperature=1, seed=2, max_tokens=20, extra_body={"guided_regex": pattern}
    )
    import re

    assert all(re.fullmatch(pattern, ch.text) for ch in r.choices), [ch.text for ch in r.choices]
    # Streamed, the pieces add up to a match too.
    pieces = [
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL, prompt="Ticket:", temperature=1, seed=9, max_tokens=20, stream=True,
            extra_body={"guided_regex": pattern},
        )
        if ch.choices
    ]
    assert re.fullmatch(pattern, "".join(pieces)), pieces


def test_32_concurrent_requests_each_follow_their_own_schema(qwen):
    schemas = [
        {
            "type": "object",
            "properties": {f"field_{i}": {"enum": [f"v{i}a", f"v{i}b"]}, "n": {"type": "integer", "maximum": 9, "minimum": 0}},
            "required": [f"field_{i}", "n"],
            "additionalProperties": False,
        }
        for i in range(32)
    ]

    async def run():
        c = qwen.async_client()
        fmt = lambda s: {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}  # noqa: E731
        return await asyncio.gather(
            *(
                c.chat.completions.create(
                    model=MODEL, messages=ASK, temperature=1, seed=i, max_tokens=60, response_format=fmt(s)
                )
                for i, s in enumerate(schemas)
            )
        )

    answers = asyncio.run(run())
    for schema, r in zip(schemas, answers):
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def calls_of_stream(stream):
    """Tool calls assembled from streamed deltas, as OpenAI's clients assemble them."""
    calls, reasons = {}, []
    for chunk in stream:
        for ch in chunk.choices:
            reasons.append(ch.finish_reason)
            for d in ch.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or d.id
                if d.function.name:
                    call["name"] = d.function.name
                call["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], [r for r in reasons if r]


@pytest.mark.parametrize("stream", [False, True])
def test_named_and_required_tool_choice_return_valid_calls(qwen, stream):
    c = qwen.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, reason in [(named, "stop"), ("required", "tool_calls")]:
        for seed in range(3):
            kw = dict(messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1, seed=seed, max_tokens=200)
            if stream:
                calls, reasons = calls_of_stream(chat(c, stream=True, **kw))
                assert reasons == [reason]
            else:
                r = chat(c, **kw)
                assert r.choices[0].finish_reason == reason
                assert r.choices[0].message.content is None
                calls = [
                    {"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                    for t in r.choices[0].message.tool_calls
                ]
            assert len(calls) >= 1
            for call in calls:
                assert call["id"].startswith("call_")
                if choice == named:
                    assert call["name"] == "get_time"
                jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])
    # One call at most without parallel calls.
    r = chat(c, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=1, max_tokens=200,
             temperature=1)
    assert len(r.choices[0].message.tool_calls) == 1


def test_auto_tool_calls_are_parsed_from_hermes_blocks_and_results_go_back(qwen):
    c = qwen.client()
    # The random model never writes a <tool_call> block by itself; a regex makes it write one,
    # and the Hermes parser must turn it into a call (and the text before it into content).
    block = r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"location": "[a-z]{1,8}", "unit": "celsius"\}\}\n</tool_call>'
    for stream in [False, True]:
        kw = dict(messages=ASK, tools=TOOLS, temperature=1, seed=4, max_tokens=120, extra_body={"guided_regex": block})
        if stream:
            calls, reasons = calls_of_stream(chat(c, stream=True, **kw))
            assert reasons == ["tool_calls"]
        else:
            r = chat(c, **kw)
            assert r.choices[0].finish_reason == "tool_calls"
            assert r.choices[0].message.content.strip() == "Checking."
            calls = [{"name": t.function.name, "arguments": t.function.arguments, "id": t.id} for t in r.choices[0].message.tool_calls]
        assert [call["name"] for call in calls] == ["get_weather"]
        jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMS["get_weather"])
    # tool_choice "none": the same text stays content.
    r = chat(c, messages=ASK, tools=TOOLS, tool_choice="none", temperature=1, seed=4, max_tokens=120,
             extra_body={"guided_regex": block})
    assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content
    # The call and its result go back into the conversation, rendered as transformers renders
    # them (tools_expected.json records what transformers made of the same conversation).
    case = json.loads((FIXTURES / MODEL / "tools_expected.json").read_text())["cases"][2]
    r = chat(c, messages=case["messages_openai"], tools=case["tools"], max_tokens=1)
    assert r.usage.prompt_tokens == len(case["ids"])


def test_unsupported_schemas_and_conflicts_are_refused_by_name(qwen):
    c = qwen.client()
    for kw, field, words in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}}},
         "response_format", "if"),
        ({"extra_body": {"guided_regex": "a(", "guided_choice": ["a"]}}, "guided_choice", "each constrain"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
         "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"reasoning_effort": "high"}, "reasoning_effort", "chat template"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"min_tokens": 3}}, "min_tokens", "grammar"),
        ({"extra_body": {"guided_json": False}}, "guided_json", "`false`"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            chat(c, messages=ASK, max_tokens=5, **kw)
        assert e.value.param == field and words in e.value.message, (field, e.value.message)
    # A grammar that cannot continue (every token it allows is banned) ends with an error,
    # never with unconstrained text.
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"guided_regex": "x+", "bad_words": ["x"]})
    assert "grammar" in e.value.message


def test_langchain_bind_tools_and_with_structured_output(qwen):
    llm = ChatOpenAI(base_url=qwen.http + "/v1", api_key="unused", model=MODEL, temperature=1, max_tokens=200,
                     seed=7, max_retries=0)

    @tool
    def get_time(zone: Literal["UTC", "CET", "PST"]) -> str:
        """Local time in a time zone."""
        return "12:00"

    msg = llm.bind_tools([get_time], tool_choice="get_time").invoke("What time is it in Paris?")
    assert [t["name"] for t in msg.tool_calls] == ["get_time"], msg
    assert msg.tool_calls[0]["args"]["zone"] in ("UTC", "CET", "PST")

    class Issue(BaseModel):
        title: str = Field(max_length=12)
        kind: str = Field(json_schema_extra={"enum": ["bug", "feature"]})
        votes: int = Field(ge=0, le=99)

    for method in ["json_schema", "function_calling"]:
        issue = llm.with_structured_output(Issue, method=method).invoke("File an issue.")
        assert isinstance(issue, Issue) and issue.kind in ("bug", "feature") and 0 <= issue.votes <= 99, method


@pytest.fixture(scope="module")
def harmony():
    """The tiny gpt_oss with harmony special tokens and chat template."""
    server = up("gpt_oss_harmony")
    yield server
    server.stop()


def test_harmony_channels_are_separated_streamed_and_not(harmony):
    c = harmony.client()
    # The random model writes no harmony by itself; a Lark grammar makes it write an analysis
    # message and a final one, as gpt-oss does.
    grammar = (
        'start: <|channel|> "analysis" <|message|> /[a-z ]{1,30}/ <|end|> <|start|> "assistant" '
        '<|channel|> "final" <|message|> /[a-z ]{1,30}/ <|return|>'
    )
    kw = dict(model="gpt_oss_harmony", messages=ASK, temperature=1, seed=2, max_tokens=120,
              extra_body={"guided_grammar": grammar})
    r = chat(c, **kw)
    m = r.choices[0].message
    reasoning = m.model_extra["reasoning_content"]
    assert reasoning and m.content and r.choices[0].finish_reason == "stop"
    for text in (reasoning, m.content):
        assert set(text) <= set("abcdefghijklmnopqrstuvwxyz "), text
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in chat(c, stream=True, **kw):
        for ch in chunk.choices:
            streamed["content"] += ch.delta.content or ""
            streamed["reasoning_content"] += (ch.delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == {"reasoning_content": reasoning, "content": m.content}

    # A stop string cuts the message where it cuts the text: the channels after it never come.
    fixed = ('start: <|channel|> "analysis" <|message|> "thinking hard" <|end|> <|start|> "assistant" '
             '<|channel|> "final" <|message|> "done" <|return|>')
    kw = dict(model="gpt_oss_harmony", messages=ASK, max_tokens=60, stop=["hard"],
              extra_body={"guided_grammar": fixed})
    r = chat(c, **kw)
    m = r.choices[0].message
    assert (m.model_extra["reasoning_content"], m.content, r.choices[0].finish_reason) == ("thinking ", None, "stop")
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in chat(c, stream=True, **kw):
        for ch in chunk.choices:
            streamed["content"] += ch.delta.content or ""
            streamed["reasoning_content"] += (ch.delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == {"reasoning_content": "thinking ", "content": ""}


def test_harmony_tool_calls_and_reasoning_effort(harmony):
    c = harmony.client()
    for choice in [{"type": "function", "function": {"name": "get_weather"}}, "required"]:
        r = chat(c, model="gpt_oss_harmony", messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1, seed=3,
                 max_tokens=300)
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1 and r.choices[0].message.content is None, r.choices[0]
        jsonschema.validate(json.loads(calls[0].function.arguments), PARAMS[calls[0].function.name])
    # reasoning_effort reaches the template: the prompt transformers rendered with it.
    case = next(
        cs for cs in json.loads((FIXTURES / "gpt_oss_harmony" / "harmony_expected.json").read_text())["cases"]
        if cs.get("reasoning_effort")
    )
    r = chat(c, model="gpt_oss_harmony", messages=case["messages_openai"], tools=case["tools"],
             reasoning_effort=case["reasoning_effort"], tool_choice="none", max_tokens=1)
    assert r.usage.prompt_tokens == len(case["ids"])
