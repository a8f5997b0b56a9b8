"""Adds a chat template to some fixture checkpoints and records how transformers renders it.

Writes `chat_template.jinja` (the file transformers 5 reads beside tokenizer_config.json) into
tests/fixtures/{mixtral,qwen3_moe} and `chat_expected.json` with, per conversation, the
rendered prompt (`apply_chat_template(..., tokenize=False, add_generation_prompt=True)`) and its
token ids. Switchyard's template rendering is tested against these.

    tools/.venv/bin/python tools/make_chat_fixtures.py
"""

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

# ChatML-style, with Python string methods (pycompat) and tojson.
CHATML_TEMPLATE = """{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.content is string %}
{{- message.content.strip() }}
{%- else %}
{{- message.content | tojson }}
{%- endif %}
{{- '<|im_end|>\\n' }}
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


def main() -> None:
    for arch, template in [("mixtral", INST_TEMPLATE), ("qwen3_moe", CHATML_TEMPLATE)]:
        d = ROOT / arch
        (d / "chat_template.jinja").write_text(template)
        tok = AutoTokenizer.from_pretrained(d)
        cases = []
        for messages in CONVERSATIONS:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            cases.append({"messages": messages, "prompt": text, "prompt_ids": ids})
        (d / "chat_expected.json").write_text(json.dumps({"cases": cases}, ensure_ascii=False, indent=1) + "\n")
        print(arch, [len(c["prompt_ids"]) for c in cases])


if __name__ == "__main__":
    main()
