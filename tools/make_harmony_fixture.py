#!/usr/bin/env python3
"""Builds tests/fixtures/gpt_oss_harmony: a tiny random gpt_oss checkpoint whose tokenizer and
chat template speak gpt-oss's harmony format, and records how transformers renders it.

The architecture and weights are drawn as make_fixtures.py draws the `gpt_oss` fixture's (its
config, its `randomize`), from make_fixtures.py's byte-level BPE tokenizer with the harmony
special tokens added (ids 512-520, in gpt-oss's own relative order) and no BOS added on
encoding. config.json and generation_config.json list `<|return|>`, `<|endoftext|>` and
`<|call|>` as end-of-sequence ids, as gpt-oss does; tokenizer_config.json names
`<|startoftext|>` / `<|return|>` / `<|endoftext|>` as bos / eos / pad. max_position_embeddings
is 1024 (the gpt_oss fixture's 256 is shorter than a harmony prompt with tools).

`chat_template.jinja` renders OpenAI-style messages and tools as harmony: a system message
(reasoning effort from the `reasoning_effort` variable, default medium), a developer message
with the conversation's system/developer message as `# Instructions` and the tools as a
TypeScript-like `namespace functions`, then the turns: assistant content on the final channel,
tool calls as `to=functions.NAME` commentary messages ending in `<|call|>`, tool results as
messages from `functions.NAME` (named by the tool message's `name`, else by its `tool_call_id`,
else by position among the calls before it).

`harmony_expected.json` holds per conversation transformers' text
(`apply_chat_template(..., tools=..., reasoning_effort=..., add_generation_prompt=True,
tokenize=False)`) and its ids, plus the special tokens' ids. Each case must render the same in
minijinja (with transformers' `tojson`, see make_chat_fixtures.py) and, when the o200k_base
vocabulary is at hand (a directory holding `o200k_base.tiktoken` named by
TIKTOKEN_ENCODINGS_BASE), as openai_harmony renders the same conversation.

    tools/.venv/bin/python tools/make_harmony_fixture.py
    TIKTOKEN_ENCODINGS_BASE=/path/to/vocab tools/.venv/bin/python tools/make_harmony_fixture.py
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

import make_fixtures as mf
from make_chat_fixtures import check_minijinja

OUT = mf.REPO_ROOT / "tests" / "fixtures" / "gpt_oss_harmony"
# make_fixtures.py's ARCH_OFFSET holds 1-11; this fixture draws its weights with the next one.
HARMONY_OFFSET = 12

# Harmony's special tokens in the order of their gpt-oss ids (199998, 199999, 200002, 200003,
# 200005, 200006, 200007, 200008, 200012); here they follow the 512 BPE ids.
SPECIALS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|return|>",
    "<|constrain|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|call|>",
]
SPECIAL_IDS = {t: mf.VOCAB_SIZE + i for i, t in enumerate(SPECIALS)}
VOCAB_SIZE = mf.VOCAB_SIZE + len(SPECIALS)
BOS, EOS, PAD = "<|startoftext|>", "<|return|>", "<|endoftext|>"
# gpt-oss's generation_config.json: [200002 <|return|>, 199999 <|endoftext|>, 200012 <|call|>].
EOS_IDS = [SPECIAL_IDS["<|return|>"], SPECIAL_IDS["<|endoftext|>"], SPECIAL_IDS["<|call|>"]]
MAX_POSITIONS = 1024

CHAT_TEMPLATE = r"""{#- Harmony format (gpt-oss): system, developer (instructions and function tools), then the turns. #}
{%- macro text(content) %}
{%- if content is string %}
{{- content }}
{%- elif content is iterable %}
{%- for part in content %}
{%- if part.type == 'text' %}
{{- part.text }}
{%- endif %}
{%- endfor %}
{%- endif %}
{%- endmacro %}
{%- macro scalar_type(spec) %}
{%- if spec['type'] == 'string' and spec['enum'] is defined %}
{%- for value in spec['enum'] %}
{%- if not loop.first %}
{{- ' | ' }}
{%- endif %}
{{- value | tojson }}
{%- endfor %}
{%- elif spec['type'] == 'string' %}
{{- 'string' }}
{%- elif spec['type'] in ['number', 'integer'] %}
{{- 'number' }}
{%- elif spec['type'] == 'boolean' %}
{{- 'boolean' }}
{%- else %}
{{- 'any' }}
{%- endif %}
{%- endmacro %}
{%- macro ts_type(spec) %}
{%- if spec['type'] == 'array' and spec['items'] is mapping and spec['items']['enum'] is not defined and spec['items']['type'] in ['string', 'number', 'integer', 'boolean'] %}
{{- scalar_type(spec['items']) }}
{{- '[]' }}
{%- elif spec['type'] == 'array' %}
{{- 'Array<any>' }}
{%- else %}
{{- scalar_type(spec) }}
{%- endif %}
{%- endmacro %}
{%- macro functions_namespace(tools) %}
{{- '# Tools\n\n## functions\n\nnamespace functions {\n\n' }}
{%- for tool in tools %}
{%- set fn = tool.function if tool.function is defined else tool %}
{%- if fn.description %}
{{- '// ' + (fn.description | replace('\n', '\n// ')) + '\n' }}
{%- endif %}
{{- 'type ' + fn.name + ' = ' }}
{%- if fn.parameters is mapping and fn.parameters['type'] == 'object' %}
{{- '(_: {\n' }}
{%- for name, spec in (fn.parameters['properties'] if fn.parameters['properties'] is mapping else {}) | items %}
{%- if spec['description'] %}
{{- '// ' + spec['description'] + '\n' }}
{%- endif %}
{{- name }}
{%- if fn.parameters['required'] is not defined or name not in fn.parameters['required'] %}
{{- '?' }}
{%- endif %}
{{- ': ' }}
{{- ts_type(spec) }}
{{- ',' }}
{%- if spec['default'] is defined %}
{%- if spec['enum'] is defined %}
{{- ' // default: ' ~ spec['default'] }}
{%- else %}
{{- ' // default: ' + (spec['default'] | tojson) }}
{%- endif %}
{%- endif %}
{{- '\n' }}
{%- endfor %}
{{- '}) => any;\n\n' }}
{%- elif fn.parameters is mapping %}
{{- '(_: ' }}
{{- ts_type(fn.parameters) }}
{{- ') => any;\n\n' }}
{%- else %}
{{- '() => any;\n\n' }}
{%- endif %}
{%- endfor %}
{{- '} // namespace functions' }}
{%- endmacro %}
{%- set effort = reasoning_effort if reasoning_effort else 'medium' %}
{{- '<|start|>system<|message|>You are a helpful assistant.\n\nReasoning: ' + effort + '\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.' }}
{%- if tools %}
{{- "\nCalls to these tools must go to the commentary channel: 'functions'." }}
{%- endif %}
{{- '<|end|>' }}
{%- if messages and messages[0].role in ['system', 'developer'] %}
{%- set instructions = text(messages[0].content) %}
{%- set history = messages[1:] %}
{%- else %}
{%- set instructions = '' %}
{%- set history = messages %}
{%- endif %}
{%- if instructions or tools %}
{{- '<|start|>developer<|message|>' }}
{%- if instructions %}
{{- '# Instructions\n\n' + instructions }}
{%- if tools %}
{{- '\n\n' }}
{%- endif %}
{%- endif %}
{%- if tools %}
{{- functions_namespace(tools) }}
{%- endif %}
{{- '<|end|>' }}
{%- endif %}
{%- set ns = namespace(calls=[], next=0, name='') %}
{%- for message in history %}
{%- if message.role == 'user' %}
{{- '<|start|>user<|message|>' + text(message.content) + '<|end|>' }}
{%- elif message.role == 'assistant' and message.tool_calls %}
{%- set preamble = text(message.content) %}
{%- if preamble %}
{{- '<|start|>assistant<|channel|>commentary<|message|>' + preamble + '<|end|>' }}
{%- endif %}
{%- for call in message.tool_calls %}
{{- '<|start|>assistant to=functions.' + call.function.name + '<|channel|>commentary <|constrain|>json<|message|>' }}
{%- if call.function.arguments is string %}
{{- call.function.arguments }}
{%- else %}
{{- call.function.arguments | tojson }}
{%- endif %}
{{- '<|call|>' }}
{%- endfor %}
{%- set ns.calls = message.tool_calls %}
{%- set ns.next = 0 %}
{%- elif message.role == 'assistant' %}
{{- '<|start|>assistant<|channel|>final<|message|>' + text(message.content) + '<|end|>' }}
{%- elif message.role == 'tool' %}
{%- set ns.name = message.name if message.name else '' %}
{%- if not ns.name and message.tool_call_id %}
{%- for call in ns.calls %}
{%- if call.id == message.tool_call_id %}
{%- set ns.name = call.function.name %}
{%- endif %}
{%- endfor %}
{%- endif %}
{%- if not ns.name and ns.next < ns.calls | length %}
{%- set ns.name = ns.calls[ns.next].function.name %}
{%- endif %}
{%- if not ns.name %}
{{- raise_exception('A tool message answers no tool call of the assistant message before it.') }}
{%- endif %}
{%- set ns.next = ns.next + 1 %}
{{- '<|start|>functions.' + ns.name + ' to=assistant<|channel|>commentary<|message|>' + text(message.content) + '<|end|>' }}
{%- elif message.role in ['system', 'developer'] %}
{{- '<|start|>developer<|message|># Instructions\n\n' + text(message.content) + '<|end|>' }}
{%- else %}
{{- raise_exception('Unknown role: ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start|>assistant' }}
{%- endif %}
"""

# ------------------------------------------------------------------------- conversations
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather at a place.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["location"],
        },
    },
}
FORECAST_TOOL = {
    "type": "function",
    "function": {
        "name": "get_forecast",
        "description": "Daily forecast for a city.\nOne entry per day.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "description": "How many days ahead", "default": 3},
                "hourly": {"type": "boolean"},
                "fields": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["city"],
        },
    },
}


def tool_call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# (messages with dict arguments, tools or None, reasoning_effort or None).
CASES = [
    ([{"role": "user", "content": "What is the capital of France?"}], None, None),
    (
        [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "Will it rain in Oslo this week?"},
        ],
        [WEATHER_TOOL, FORECAST_TOOL],
        "high",
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
        ],
        [WEATHER_TOOL],
        None,
    ),
    # Two calls answered out of order (matched by tool_call_id), a final answer, a new question.
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo and Lima?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    tool_call("call_a", "get_weather", {"location": "Oslo"}),
                    tool_call("call_b", "get_forecast", {"city": "Lima", "days": 1, "fields": ["sky"]}),
                ],
            },
            {"role": "tool", "tool_call_id": "call_b", "content": '[{"day": 1, "sky": "clear"}]'},
            {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature": -3, "sky": "snow"}'},
            {"role": "assistant", "content": "Oslo: -3 °C and snow. Lima: clear."},
            {"role": "user", "content": "Thanks! Which is warmer?"},
        ],
        [WEATHER_TOOL, FORECAST_TOOL],
        "low",
    ),
]


def openai_form(messages: list[dict]) -> list[dict]:
    """`messages` as an OpenAI client sends them: tool call `arguments` as compact JSON strings."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False, separators=(",", ":"))
    return out


# --------------------------------------------------------------------------- checkpoint


def build_tokenizer() -> PreTrainedTokenizerFast:
    """make_fixtures.py's tokenizer without its BOS post-processor, plus the harmony tokens."""
    raw = Tokenizer.from_str(mf.build_tokenizer().backend_tokenizer.to_str())
    raw.post_processor = None
    assert raw.add_special_tokens(SPECIALS) == len(SPECIALS)
    for token, i in SPECIAL_IDS.items():
        assert raw.token_to_id(token) == i, (token, raw.token_to_id(token))
    assert raw.get_vocab_size() == VOCAB_SIZE
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def build_checkpoint(out: Path, seed: int) -> None:
    config = mf.make_config("gpt_oss")
    config.vocab_size = VOCAB_SIZE
    config.bos_token_id = SPECIAL_IDS[BOS]
    config.eos_token_id = EOS_IDS
    config.pad_token_id = SPECIAL_IDS[PAD]
    # Harmony prompts with tools run to ~800 ids with this small BPE: room for them (and a
    # reply) within max_position_embeddings, which servers take as the context length. YaRN's
    # frequencies come from `factor` and `original_max_position_embeddings` alone.
    config.max_position_embeddings = MAX_POSITIONS
    sub_seed = seed * mf.SEED_STRIDE + HARMONY_OFFSET * mf.REDRAW_STRIDE
    torch.manual_seed(sub_seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    mf.randomize(model, "gpt_oss", torch.Generator().manual_seed(sub_seed))

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(out)
    GenerationConfig(bos_token_id=SPECIAL_IDS[BOS], eos_token_id=EOS_IDS, pad_token_id=SPECIAL_IDS[PAD]).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    print(f"checkpoint: sub_seed={sub_seed} vocab={VOCAB_SIZE} eos={EOS_IDS}")


# -------------------------------------------------------------------------------- checks


@functools.cache
def harmony_encoding():
    """openai_harmony's gpt-oss encoding, or None when its o200k_base vocabulary cannot be loaded."""
    try:
        import openai_harmony as oh

        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as err:  # no vocabulary here: nothing to compare with
        print(f"  openai_harmony unavailable ({err}); comparison skipped")
        return None


def harmony_text(messages: list[dict], tools: list[dict] | None, effort: str | None):
    """The same conversation rendered by openai_harmony (system message without knowledge cutoff
    and date), or None when it is unavailable."""
    enc = harmony_encoding()
    if enc is None:
        return None
    import openai_harmony as oh

    efforts = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM, "high": oh.ReasoningEffort.HIGH}
    system = oh.SystemContent.new().with_model_identity("You are a helpful assistant.")
    system = system.with_reasoning_effort(efforts[effort or "medium"]).with_knowledge_cutoff(None)
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    history, instructions = messages, None
    if messages and messages[0]["role"] in ("system", "developer"):
        instructions, history = messages[0]["content"], messages[1:]
    if instructions or tools:
        dev = oh.DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools(
                [
                    oh.ToolDescription.new(t["function"]["name"], t["function"].get("description", ""), parameters=t["function"].get("parameters"))
                    for t in tools
                ]
            )
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))
    calls, position = [], 0
    for m in history:
        if m["role"] == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, m["content"]))
        elif m["role"] == "assistant" and m.get("tool_calls"):
            if m.get("content"):
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["content"]).with_channel("commentary"))
            for call in m["tool_calls"]:
                args = json.dumps(call["function"]["arguments"], ensure_ascii=False)  # as transformers' tojson
                msg = oh.Message.from_role_and_content(oh.Role.ASSISTANT, args).with_channel("commentary")
                out.append(msg.with_recipient("functions." + call["function"]["name"]).with_content_type("<|constrain|>json"))
            calls, position = m["tool_calls"], 0
        elif m["role"] == "assistant":
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["content"]).with_channel("final"))
        elif m["role"] == "tool":
            by_id = [c["function"]["name"] for c in calls if c["id"] == m.get("tool_call_id")]
            name = m.get("name") or (by_id[0] if by_id else calls[position]["function"]["name"])
            position += 1
            author = oh.Author.new(oh.Role.TOOL, "functions." + name)
            out.append(oh.Message.from_author_and_content(author, m["content"]).with_recipient("assistant").with_channel("commentary"))
        else:
            raise ValueError(m["role"])
    tokens = enc.render_conversation_for_completion(oh.Conversation.from_messages(out), oh.Role.ASSISTANT)
    return enc.decode_utf8(tokens)


@torch.no_grad()
def check_checkpoint(out: Path, tok, cases: list[dict]) -> None:
    """transformers reads the checkpoint back: no BOS added on encoding, each special token one
    id, the ids decode to the text, and the model runs over the longest prompt."""
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"], "a token was added"
    for token, i in SPECIAL_IDS.items():
        assert tok(token, add_special_tokens=False)["input_ids"] == [i], token
    for case in cases:
        assert tok.decode(case["ids"]) == case["text"]
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert cfg["vocab_size"] == len(tok) == VOCAB_SIZE and cfg["eos_token_id"] == gen["eos_token_id"] == EOS_IDS
    model = mf.load_model(out)
    ids = max((c["ids"] for c in cases), key=len)
    logits = model(torch.tensor([ids])).logits[0]
    assert len(ids) < MAX_POSITIONS and logits.shape == (len(ids), VOCAB_SIZE) and torch.isfinite(logits).all()
    print(f"  transformers runs {len(ids)} prompt ids; greedy next id {int(logits[-1].argmax())}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="output directory")
    ap.add_argument("--seed", type=int, default=0, help="weight seed, as make_fixtures.py's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    build_checkpoint(args.out, args.seed)
    tok = AutoTokenizer.from_pretrained(args.out)
    cases, stock, harmony_agrees = [], [], []
    for i, (messages, tools, effort) in enumerate(CASES):
        kwargs = {"reasoning_effort": effort} if effort else {}
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ctx = dict(messages=messages, tools=tools, add_generation_prompt=True, **kwargs)
        stock.append(check_minijinja(CHAT_TEMPLATE, text, f"harmony case {i}", **ctx))
        theirs = harmony_text(messages, tools, effort)
        if theirs is not None:
            assert theirs == text, f"case {i}: openai_harmony renders differently:\n{theirs}\n---\n{text}"
            harmony_agrees.append(i)
        case = {"messages": messages, "messages_openai": openai_form(messages), "tools": tools}
        if effort:
            case["reasoning_effort"] = effort
        cases.append({**case, "text": text, "ids": ids})
    expected = {"special_ids": SPECIAL_IDS, "cases": cases}
    (args.out / "harmony_expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n")
    check_checkpoint(args.out, tok, cases)
    for f in args.out.iterdir():  # save_pretrained writes safetensors as 0600
        f.chmod(0o644)
    print(f"  cases: {[len(c['ids']) for c in cases]} ids; minijinja's stock tojson agrees: {stock}")
    print(f"  openai_harmony renders the same text for cases {harmony_agrees} of {len(cases)}")
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"  files: {sorted(f.name for f in args.out.iterdir())} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
