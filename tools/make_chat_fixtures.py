"""Adds a chat template to some fixture checkpoints and records how transformers renders it.

Writes `chat_template.jinja` (the file transformers 5 reads beside tokenizer_config.json) into
tests/fixtures/{mixtral,qwen3_moe} and `chat_expected.json` with, per conversation, the
rendered prompt (`apply_chat_template(..., tokenize=False, add_generation_prompt=True)`) and its
token ids. Switchyard's template rendering is tested against these.

The qwen3_moe template also speaks Hermes-style tool calling (a `<tools>` list in the system
turn, `<tool_call>` blocks in assistant turns, `<tool_response>` blocks in user turns);
`tools_expected.json` records transformers' rendering of tool conversations with it. Without
`tools` and tool messages the template renders exactly what it rendered before.

Every case is also rendered with minijinja (the `minijinja` Python binding of the engine
Switchyard embeds, trim_blocks and lstrip_blocks on, Python string methods on) with `tojson`
replaced by transformers' own `tojson`, and must come out identical.

    tools/.venv/bin/python tools/make_chat_fixtures.py
"""

import argparse
import copy
import json
import pathlib

from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"

# Mistral-style: an optional system prompt folded into the first user turn, [INST] markers,
# strict alternation enforced with raise_exception.
INST_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = none %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system is not none %}
            {{- '[INST] ' + system + '\\n\\n' + message['content'] | trim + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] | trim + ' [/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- endif %}
{%- endfor %}
"""

# ChatML-style, with Python string methods (pycompat) and tojson. With `tools`, a system turn
# (holding the conversation's own system message first, if it opens with one) lists each tool
# as one `tojson` line; assistant `tool_calls` become `<tool_call>` blocks (a dict `arguments`
# through `tojson`, a string one as it is); consecutive `tool` messages share one user turn of
# `<tool_response>` blocks.
CHATML_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}
{%- if messages[0].content is string %}
{{- messages[0].content.strip() + '\\n\\n' }}
{%- else %}
{{- (messages[0].content | tojson) + '\\n\\n' }}
{%- endif %}
{%- endif %}
{{- '# Tools\\n\\nThe functions below are at your disposal. Each line between <tools> and </tools> is the JSON schema of one function:\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' + (tool | tojson) }}
{%- endfor %}
{{- '\\n</tools>\\n\\nTo use a function, answer with a JSON object naming it and giving its arguments, wrapped in <tool_call></tool_call> tags, one block per call:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if tools and loop.first and message.role == 'system' %}
{#- already rendered in the tools turn #}
{%- elif message.role == 'tool' %}
{%- if loop.first or loop.previtem.role != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\\n<tool_response>\\n' }}
{%- if message.content is string %}
{{- message.content.strip() }}
{%- else %}
{{- message.content | tojson }}
{%- endif %}
{{- '\\n</tool_response>' }}
{%- if loop.last or loop.nextitem.role != 'tool' %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- elif message.tool_calls %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.content is string and message.content.strip() %}
{{- message.content.strip() + '\\n' }}
{%- endif %}
{%- for call in message.tool_calls %}
{%- if not loop.first %}
{{- '\\n' }}
{%- endif %}
{{- '<tool_call>\\n{"name": ' + (call.function.name | tojson) + ', "arguments": ' }}
{%- if call.function.arguments is string %}
{{- call.function.arguments }}
{%- else %}
{{- call.function.arguments | tojson }}
{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.content is string %}
{{- message.content.strip() }}
{%- else %}
{{- message.content | tojson }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "def fibonacci(n):"}],
    [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "  Sort a list.  "},
        {"role": "assistant", "content": "sorted(xs)"},
        {"role": "user", "content": "In place?"},
    ],
    [{"role": "user", "content": "héllo wörld ✓"}],
]

# ------------------------------------------------------------------- tool calling
# OpenAI-style function tools, as passed to `apply_chat_template(..., tools=...)`. The
# descriptions hold a non-ASCII letter (tojson keeps it as it is) and an apostrophe (which
# minijinja's stock tojson would escape as \\u0027).
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather at a place, e.g. Zürich.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_local_time",
        "description": "The city's local time, ISO 8601.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "seconds": {"type": "boolean"}},
            "required": ["city"],
        },
    },
}


def tool_call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# (messages with dict arguments, tools or None).
TOOL_CASES = [
    ([{"role": "user", "content": "What's the weather in Paris?"}], [WEATHER_TOOL]),
    (
        [
            {"role": "system", "content": "You are a travel assistant. Be brief."},
            {"role": "user", "content": "Is it late in Tokyo, and is it raining there?"},
        ],
        [WEATHER_TOOL, TIME_TOOL],
    ),
    (
        [
            {"role": "user", "content": "What's the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [tool_call("call_1", "get_weather", {"location": "Paris", "unit": "celsius"})],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "cloudy"}'},
            {"role": "user", "content": "Should I take an umbrella?"},
        ],
        [WEATHER_TOOL],
    ),
    (
        [
            {"role": "user", "content": "Compare the weather in Oslo and Lima."},
            {
                "role": "assistant",
                "content": "I'll look both up.",
                "tool_calls": [
                    tool_call("call_a", "get_weather", {"location": "Oslo"}),
                    tool_call("call_b", "get_weather", {"location": "Lima", "unit": "fahrenheit"}),
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature": -3, "sky": "snow"}'},
            {"role": "tool", "tool_call_id": "call_b", "content": '{"temperature": 70, "sky": "clear"}'},
        ],
        [WEATHER_TOOL, TIME_TOOL],
    ),
]


def openai_form(messages: list[dict]) -> list[dict]:
    """`messages` as an OpenAI client sends them: each tool call's `arguments` a JSON string
    (compact, as OpenAI's API writes it), so that only a server that parses it back to an
    object before rendering (as vLLM does) reproduces transformers' text."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False, separators=(",", ":"))
    return out


# ------------------------------------------------------------------- minijinja check


def transformers_tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' `tojson` (transformers.utils.chat_template_utils): plain `json.dumps`,
    `", "` / `": "` separators, keys in insertion order, non-ASCII kept, no HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def minijinja_render(template: str, stock_tojson: bool = False, **context) -> str:
    """`template` rendered by minijinja as Switchyard sets it up (trim_blocks, lstrip_blocks,
    pycompat string methods, `raise_exception`); `tojson` is transformers' unless
    `stock_tojson` (minijinja's own: the same separators, but `<>&'` escaped as \\u003c...)."""
    import minijinja

    def raise_exception(message):
        raise RuntimeError(message)

    env = minijinja.Environment(trim_blocks=True, lstrip_blocks=True)
    env.pycompat = True
    env.add_function("raise_exception", raise_exception)
    if not stock_tojson:
        env.add_filter("tojson", transformers_tojson)
    return env.render_str(template, **context)


def check_minijinja(template: str, text: str, label: str, **context) -> bool:
    """Asserts that minijinja (with transformers' tojson) renders `text`; returns whether
    minijinja's stock tojson renders it too."""
    theirs = minijinja_render(template, **context)
    assert theirs == text, f"{label}: minijinja renders differently:\n{theirs!r}\n{text!r}"
    return minijinja_render(template, stock_tojson=True, **context) == text


# ------------------------------------------------------------------------------ main


def write_tool_cases(d: pathlib.Path, tok, template: str) -> None:
    cases, stock = [], []
    for i, (messages, tools) in enumerate(TOOL_CASES):
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ctx = dict(messages=messages, tools=tools, add_generation_prompt=True, bos_token=tok.bos_token, eos_token=tok.eos_token)
        stock.append(check_minijinja(template, text, f"tool case {i}", **ctx))
        # The OpenAI form renders the same once its arguments are parsed back.
        parsed = openai_form(messages)
        for m in parsed:
            for call in m.get("tool_calls") or []:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        assert tok.apply_chat_template(parsed, tools=tools, tokenize=False, add_generation_prompt=True) == text
        cases.append({"messages": messages, "messages_openai": openai_form(messages), "tools": tools, "text": text, "ids": ids})
    (d / "tools_expected.json").write_text(json.dumps({"cases": cases}, ensure_ascii=False, indent=1) + "\n")
    print(f"{d.name} tools: {[len(c['ids']) for c in cases]} ids; minijinja's stock tojson agrees: {stock}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=pathlib.Path, default=ROOT, help="fixture root (default tests/fixtures)")
    args = ap.parse_args()
    for arch, template in [("mixtral", INST_TEMPLATE), ("qwen3_moe", CHATML_TEMPLATE)]:
        d = args.fixtures / arch
        (d / "chat_template.jinja").write_text(template)
        tok = AutoTokenizer.from_pretrained(d)
        cases = []
        for i, messages in enumerate(CONVERSATIONS):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            ctx = dict(messages=messages, add_generation_prompt=True, bos_token=tok.bos_token, eos_token=tok.eos_token)
            check_minijinja(template, text, f"{arch} case {i}", **ctx)
            cases.append({"messages": messages, "prompt": text, "prompt_ids": ids})
        (d / "chat_expected.json").write_text(json.dumps({"cases": cases}, ensure_ascii=False, indent=1) + "\n")
        print(arch, [len(c["prompt_ids"]) for c in cases])
        if arch == "qwen3_moe":
            write_tool_cases(d, tok, template)


if __name__ == "__main__":
    main()
