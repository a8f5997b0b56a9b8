"""lm-evaluation-harness itself (`lm_eval --model local-completions`, from PyPI) scores
loglikelihood documents against a running `switchyard up`: it sends `echo: true, logprobs: 1,
max_tokens: 1` with token-id prompts and reads the prompt's log-probabilities. Every sample
must equal what transformers computes for the same tokens (recorded by
tools/record_lm_eval.py): the log-likelihood within 1e-3 per token, is-greedy exactly."""

import json
import os
import subprocess
import sys

from conftest import FIXTURES

MODEL = "qwen3_moe"
TOLERANCE = 1e-3
TASK = """task: switchyard_code_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_loglikelihoods_equal_transformers(qwen, tmp_path):
    expected = json.loads((FIXTURES / MODEL / "lm_eval.json").read_text())["docs"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": d["context"], "continuation": d["continuation"]}) + "\n" for d in expected))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "switchyard.yaml").write_text(TASK.format(data=data))
    served = qwen.client().models.list().data[0].id
    model_args = (
        f"model={served},base_url={qwen.http}/v1/completions,tokenizer={FIXTURES / MODEL},"
        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
         "--tasks", "switchyard_code_loglikelihood", "--include_path", str(tmp_path / "tasks"),
         "--log_samples", "--output_path", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_*.jsonl") for line in f.read_text().splitlines()]
    assert len(samples) == len(expected), "one logged sample per document"
    greedy_seen = 0
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        want = expected[s["doc_id"]]
        ll, greedy = s["resps"][0][0]
        greedy = greedy in (True, "True")  # logged as text by some versions
        print(f"doc {s['doc_id']}: lm-eval {float(ll):.5f} {greedy}, transformers {want['loglikelihood']:.5f} {want['greedy']}")
        assert abs(float(ll) - want["loglikelihood"]) <= TOLERANCE * want["tokens"], (s["doc_id"], ll, want)
        assert greedy == want["greedy"], (s["doc_id"], want)
        greedy_seen += want["greedy"]
    assert 0 < greedy_seen < len(expected), "is-greedy is checked both ways"
