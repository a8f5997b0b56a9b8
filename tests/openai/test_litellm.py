"""LiteLLM (from PyPI) against a real `up`, as its users point it at an OpenAI-compatible
server (`openai/<model>` with `api_base`): chat, streamed chat, text completions and the
async client answer what the `openai` client gets for the same greedy requests, usage
included, and a refused field comes back as LiteLLM's BadRequestError with the server's
message."""

import asyncio
import os

import pytest

# Offline: the model price list from the package, not from the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm  # noqa: E402

MODEL = "qwen3_moe"
PROMPT = "def fibonacci(n):"


def kw(qwen):
    return dict(model="openai/" + MODEL, api_base=qwen.http + "/v1", api_key="unused", max_tokens=12, temperature=0)


def test_chat_and_streamed_chat_answer_what_the_openai_client_gets(qwen):
    messages = [{"role": "user", "content": PROMPT}]
    direct = qwen.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    answer = litellm.completion(messages=messages, **kw(qwen))
    assert answer.choices[0].message.content == direct.choices[0].message.content
    assert answer.usage.completion_tokens == direct.usage.completion_tokens
    assert answer.usage.prompt_tokens == direct.usage.prompt_tokens
    streamed = litellm.completion(messages=messages, stream=True, **kw(qwen))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == direct.choices[0].message.content


def test_text_completion_and_the_async_client(qwen):
    client = qwen.client()
    direct = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    text = litellm.text_completion(prompt=PROMPT, **kw(qwen))
    assert text.choices[0].text == direct.choices[0].text
    assert text.usage.completion_tokens == direct.usage.completion_tokens

    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)

    async def concurrently():
        return await asyncio.gather(*(litellm.acompletion(messages=messages, **kw(qwen)) for _ in range(3)))

    answers = asyncio.run(concurrently())
    assert [a.choices[0].message.content for a in answers] == [chat.choices[0].message.content] * 3


def test_a_refused_field_is_a_bad_request_naming_it(qwen):
    with pytest.raises(litellm.BadRequestError) as e:
        litellm.completion(messages=[{"role": "user", "content": PROMPT}], extra_body={"temprature": 0}, **kw(qwen))
    assert "temprature" in str(e.value)
