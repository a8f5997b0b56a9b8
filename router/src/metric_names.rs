//! The router's metrics, named like vLLM's with a `switchyard:` prefix, recorded through the
//! `metrics` crate and rendered by `/metrics` in Prometheus' text format.

/// Histogram buckets for latencies, in seconds.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

pub const RUNNING: &str = "switchyard:num_requests_running";
pub const WAITING: &str = "switchyard:num_requests_waiting";
/// Fraction of the KV-cache blocks reserved by running sequences (0–1).
pub const KV_CACHE_USAGE: &str = "switchyard:kv_cache_usage_perc";
pub const PROMPT_TOKENS: &str = "switchyard:prompt_tokens_total";
/// Prompt tokens of admitted requests that could have come from the prefix cache, and
/// those that did (vLLM's `prefix_cache_queries` and `prefix_cache_hits`): their ratio is
/// the hit rate.
pub const PREFIX_CACHE_QUERIES: &str = "switchyard:prefix_cache_queries_total";
pub const PREFIX_CACHE_HITS: &str = "switchyard:prefix_cache_hits_total";
/// KV-cache blocks kept for reuse by prefix caching (held or idle).
pub const PREFIX_CACHE_BLOCKS: &str = "switchyard:prefix_cache_blocks";
pub const GENERATION_TOKENS: &str = "switchyard:generation_tokens_total";
pub const REQUESTS: &str = "switchyard:request_success_total";
pub const TIME_TO_FIRST_TOKEN: &str = "switchyard:time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "switchyard:inter_token_latency_seconds";
pub const E2E_LATENCY: &str = "switchyard:e2e_request_latency_seconds";
pub const QUEUE_TIME: &str = "switchyard:request_queue_time_seconds";
pub const DISPATCH_LATENCY: &str = "switchyard:expert_node_dispatch_latency_seconds";
pub const ROUTED_TOKENS: &str = "switchyard:expert_routed_tokens_total";
/// Dispatch shares re-sent to another replica, by the status that made the router retry.
pub const DISPATCH_RETRIES: &str = "switchyard:expert_dispatch_retries_total";
/// Time tokenizing one request's prompts (and rendering its chat template), on the
/// tokenizer pool.
pub const TOKENIZE_TIME: &str = "switchyard:tokenize_seconds";
pub const TENANT_REQUESTS: &str = "switchyard:tenant_requests_total";
pub const TENANT_PROMPT_TOKENS: &str = "switchyard:tenant_prompt_tokens_total";
pub const TENANT_GENERATION_TOKENS: &str = "switchyard:tenant_generation_tokens_total";
pub const TENANT_REJECTED: &str = "switchyard:tenant_rejected_total";
/// Requests admitted without the coordinators' budget, because no coordinator answered.
pub const TENANT_UNCHECKED: &str = "switchyard:tenant_unchecked_total";
