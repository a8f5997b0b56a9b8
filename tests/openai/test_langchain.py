"""LangChain's OpenAI integrations (`langchain-openai`, from PyPI) against a real `up`: the chat
model and the completions LLM, invoked, streamed and batched, answer what the `openai` client
gets for the same greedy requests."""

from langchain_openai import ChatOpenAI, OpenAI

MODEL = "qwen3_moe"


def test_chat_openai_invokes_and_streams_the_served_model(qwen):
    chat = ChatOpenAI(base_url=qwen.http + "/v1", api_key="unused", model=MODEL, max_tokens=12, temperature=0, max_retries=0)
    answer = chat.invoke("def fibonacci(n):")
    direct = qwen.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "def fibonacci(n):"}], max_tokens=12, temperature=0
    )
    assert answer.content == direct.choices[0].message.content
    assert answer.usage_metadata["output_tokens"] == direct.usage.completion_tokens
    assert "".join(chunk.content for chunk in chat.stream("def fibonacci(n):")) == answer.content


def test_the_completions_llm_invokes_streams_and_batches(qwen):
    llm = OpenAI(base_url=qwen.http + "/v1", api_key="unused", model=MODEL, max_tokens=12, temperature=0, max_retries=0)
    prompts = ["def fibonacci(n):", "class Stack:"]
    direct = [
        qwen.client().completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text for p in prompts
    ]
    assert llm.invoke(prompts[0]) == direct[0]
    assert "".join(llm.stream(prompts[0])) == direct[0]
    assert llm.batch(prompts) == direct
