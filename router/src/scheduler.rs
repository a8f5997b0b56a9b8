//! The engine thread: owns the [`Engine`] and every running [`Sequence`]. Each step runs the
//! running sequences' next tokens together with the next chunks of newly admitted prompts;
//! requests join at the next step and leave as soon as they finish or their client goes.
//! The gRPC side holds a [`Scheduler`] handle and reads each request's events from a channel.
//!
//! The engine thread is supervised: a panic or a device fault in a step is caught and logged
//! with its cause, every request it holds fails with [`ServeError::EngineFailed`], and
//! [`EngineHealth`] turns the router NOT_SERVING (gRPC health and HTTP `/health`) instead of
//! leaving a thread dead behind a healthy-looking server.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics::{counter, gauge, histogram};

use switchyard_model::engine::{GeneratedToken, PromptLogprob};
use switchyard_model::grammar::Constraint;
use switchyard_model::kv_cache::{BLOCK_TOKENS, blocks_for};
use switchyard_model::{Engine, FinishReason, GenerateRequest, ModelError, SamplingControls, Sequence};
use switchyard_proto::MAX_DISPATCH_TOKENS;

use crate::metric_names as names;
use tokio::sync::mpsc;

/// What happens to a request, in order: `Started`, `PromptLogprobs` where asked, a `Token` per
/// generated token, `Finished`;
/// or an error at any point, after which nothing follows.
#[derive(Debug)]
pub enum Event {
    Started {
        prompt_ids: Vec<u32>,
        /// Leading prompt tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
    },
    /// The prompt tokens' log-probabilities (all but the first), once the prefill is done and
    /// before any `Token`; only where the request asked for them.
    PromptLogprobs(Vec<PromptLogprob>),
    Token(GeneratedToken),
    Finished(FinishReason),
}

/// Why a request was refused or failed. Each front end maps it to its own status in one
/// place: `convert.rs` (gRPC) and `http/error.rs` (HTTP).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    /// The request does not fit the model (an empty or too long prompt, a token outside the
    /// vocabulary, a sampling value out of range); the message names the value.
    #[error(transparent)]
    Invalid(Arc<ModelError>),
    /// Prompt + `max_tokens` can never fit the KV cache, however long the request waits.
    #[error(
        "prompt + max_tokens need {need} KV-cache blocks of {BLOCK_TOKENS} tokens but the whole cache has \
         {capacity}; lower max_tokens or raise --kv-cache-memory"
    )]
    KvCacheTooSmall { need: usize, capacity: usize },
    /// Too many requests are waiting; retry later.
    #[error("the router's request queue is full ({waiting} waiting); retry later")]
    QueueFull { waiting: usize },
    /// The router is shutting down, or stopped mid-generation.
    #[error("the router is shutting down")]
    ShuttingDown,
    /// An expert has no reachable replica now (the cluster may recover).
    #[error(transparent)]
    ExpertsUnavailable(Arc<ModelError>),
    /// The engine thread failed; this router no longer serves.
    #[error("the router's engine failed and no longer serves: {reason}")]
    EngineFailed { reason: String },
    /// A forward pass failed (a dispatch or device error, or NaN or infinite activations).
    #[error("generation failed: {0}")]
    StepFailed(Arc<ModelError>),
    /// The request's grammar (structured output) could not continue: the reason, after
    /// whatever tokens it generated.
    #[error("{0}")]
    GrammarFailed(String),
    /// The engine and a front end disagree (a bug in the router).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Whether the engine thread still runs; set once, when it fails.
#[derive(Debug)]
pub struct EngineHealth {
    failed: OnceLock<String>,
    changed: tokio::sync::watch::Sender<bool>,
}

impl Default for EngineHealth {
    fn default() -> Self {
        EngineHealth { failed: OnceLock::new(), changed: tokio::sync::watch::channel(false).0 }
    }
}

impl EngineHealth {
    /// Why the engine failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Waits until the engine fails.
    pub async fn failed(&self) -> String {
        let mut rx = self.changed.subscribe();
        let _ = rx.wait_for(|&f| f).await;
        self.failure().unwrap_or_default().to_string()
    }

    fn fail(&self, reason: String) {
        tracing::error!("the router stops serving: {reason}");
        let _ = self.failed.set(reason);
        self.changed.send_replace(true);
    }
}

pub type Events = mpsc::UnboundedSender<Result<Event, ServeError>>;

/// One request handed to the engine thread (prompt already tokenized); its events go to
/// `events`, the first being `Started` or an error. Dropping the receiver cancels it.
pub struct Submission {
    pub request: GenerateRequest,
    /// Penalties, logit bias, banned words, min-p, min-tokens and stop token ids.
    pub controls: SamplingControls,
    /// The grammar its output follows (structured output), if any.
    pub constraint: Option<Constraint>,
    pub events: Events,
    /// Whose request it is (for fair sharing between tenants); `None` when the API is open.
    pub tenant: Option<String>,
    /// Higher is admitted first.
    pub priority: i32,
    /// The request's span (`Span::none()` when untraced).
    pub span: tracing::Span,
}

/// A sequence on the engine thread, with what it reports to.
struct Running {
    seq: Sequence,
    events: Events,
    tenant: Option<String>,
    /// The request's span: engine steps are traced under it.
    span: tracing::Span,
    submitted: Instant,
    last_token: Option<Instant>,
}

/// Requests waiting for and running on the engine thread.
#[derive(Default)]
pub struct Load {
    pub queued: AtomicU32,
    pub running: AtomicU32,
}

/// Faults a test injects into the engine thread (hidden router flags).
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineFaults {
    /// Panic in this step (1 = the first).
    pub panic_at_step: Option<u64>,
}

#[derive(Clone)]
pub struct Scheduler {
    submissions: mpsc::UnboundedSender<(Submission, Instant)>,
    pub load: Arc<Load>,
    pub health: Arc<EngineHealth>,
    max_queue: usize,
    /// The model's vocabulary size, for checking token ids before a request is queued.
    pub vocab_size: usize,
}

impl Scheduler {
    /// Starts the engine thread; at most `max_batch` sequences run at once and at most
    /// `max_queue` wait.
    pub fn start(engine: Engine, max_batch: usize, max_queue: usize, faults: EngineFaults) -> std::io::Result<Self> {
        let (submissions, rx) = mpsc::unbounded_channel::<(Submission, Instant)>();
        let load = Arc::new(Load::default());
        let health = Arc::new(EngineHealth::default());
        let vocab_size = engine.model.spec.vocab_size;
        let engine_loop = EngineLoop {
            engine,
            max_batch: max_batch.max(1),
            load: load.clone(),
            health: health.clone(),
            faults,
            steps: 0,
            running: Vec::new(),
            waiting: Vec::new(),
        };
        std::thread::Builder::new().name("router-engine".into()).spawn(move || engine_loop.run(rx))?;
        Ok(Scheduler { submissions, load, health, max_queue: max_queue.max(1), vocab_size })
    }

    /// Queues `s`, or refuses it when the queue is full or the engine has stopped.
    pub fn submit(&self, s: Submission) -> Result<(), ServeError> {
        if let Some(reason) = self.health.failure() {
            return Err(ServeError::EngineFailed { reason: reason.to_string() });
        }
        // Counted before sending: the engine thread may admit it (and count it out) at once.
        if self.load.queued.fetch_add(1, Ordering::Relaxed) as usize >= self.max_queue {
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ServeError::QueueFull { waiting: self.max_queue });
        }
        self.submissions.send((s, Instant::now())).map_err(|_| {
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
            match self.health.failure() {
                Some(reason) => ServeError::EngineFailed { reason: reason.to_string() },
                None => ServeError::ShuttingDown,
            }
        })?;
        gauge!(names::WAITING).set(self.load.queued.load(Ordering::Relaxed) as f64);
        Ok(())
    }
}

struct EngineLoop {
    engine: Engine,
    max_batch: usize,
    load: Arc<Load>,
    health: Arc<EngineHealth>,
    faults: EngineFaults,
    /// Steps run so far.
    steps: u64,
    running: Vec<Running>,
    /// Submitted, not yet admitted, oldest first.
    waiting: Vec<(Submission, Instant)>,
}

impl EngineLoop {
    /// Serves until every handle is gone; if the loop panics or the device faults, fails what
    /// it holds and marks the engine failed.
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<(Submission, Instant)>) {
        let reason = match catch_unwind(AssertUnwindSafe(|| self.serve(&mut rx))) {
            Ok(Ok(())) => return,
            Ok(Err(fault)) => format!("device fault in a step: {fault}"),
            Err(panic) => format!("a panic in the engine thread: {}", switchyard_model::error::panic_message(&*panic)),
        };
        self.health.fail(reason.clone());
        rx.close();
        let err = ServeError::EngineFailed { reason };
        for r in self.running.drain(..) {
            let _ = r.events.send(Err(err.clone()));
        }
        while let Ok(s) = rx.try_recv() {
            self.waiting.push(s);
        }
        for (s, _) in self.waiting.drain(..) {
            let _ = s.events.send(Err(err.clone()));
        }
        self.load.queued.store(0, Ordering::Relaxed);
        self.publish();
    }

    /// The loop: admit, step, repeat. Returns when every handle is gone, or with the error
    /// of a step that faulted the device.
    fn serve(&mut self, rx: &mut mpsc::UnboundedReceiver<(Submission, Instant)>) -> Result<(), String> {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.blocking_recv() {
                    Some(s) => self.waiting.push(s),
                    None => return Ok(()),
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.waiting.push(s);
            }
            // A client that went away frees its slot, waiting or running.
            let before = self.waiting.len();
            self.waiting.retain(|(s, _)| !s.events.is_closed());
            self.load.queued.fetch_sub((before - self.waiting.len()) as u32, Ordering::Relaxed);
            self.running.retain(|r| !r.events.is_closed());
            while self.running.len() < self.max_batch && !self.waiting.is_empty() {
                let i = self.pick();
                // A request the model cannot serve is refused before it is weighed for memory.
                let (request, controls) = (&self.waiting[i].0.request, &self.waiting[i].0.controls);
                if let Err(e) = self.engine.validate_with(request, controls) {
                    let (s, _) = self.waiting.remove(i);
                    self.load.queued.fetch_sub(1, Ordering::Relaxed);
                    let _ = s.events.send(Err(ServeError::Invalid(Arc::new(e))));
                    continue;
                }
                let pool = &self.engine.kv_pool;
                let need = blocks_for(Engine::kv_tokens(&self.waiting[i].0.request));
                if need > pool.capacity() {
                    let (s, _) = self.waiting.remove(i);
                    self.load.queued.fetch_sub(1, Ordering::Relaxed);
                    let capacity = pool.capacity();
                    let _ = s.events.send(Err(ServeError::KvCacheTooSmall { need, capacity }));
                    continue;
                }
                if self.engine.blocks_needed(&self.waiting[i].0.request) > pool.available() {
                    break; // waits until running sequences give blocks back
                }
                let next = self.waiting.remove(i);
                self.admit(next);
            }
            self.publish();
            if !self.running.is_empty() {
                self.step()?;
                self.publish();
            }
        }
    }

    /// Which waiting request to admit next: the highest priority; among equals, the tenant
    /// with the fewest running requests (fair sharing); then the oldest.
    fn pick(&self) -> usize {
        let running_of = |t: &Option<String>| self.running.iter().filter(|r| &r.tenant == t).count();
        (0..self.waiting.len())
            .min_by_key(|&i| {
                let s = &self.waiting[i].0;
                (std::cmp::Reverse(s.priority), running_of(&s.tenant), i)
            })
            .expect("waiting is not empty")
    }

    /// Running and waiting counts for the status RPC and the metrics.
    fn publish(&self) {
        self.load.running.store(self.running.len() as u32, Ordering::Relaxed);
        gauge!(names::RUNNING).set(self.running.len() as f64);
        gauge!(names::WAITING).set(self.load.queued.load(Ordering::Relaxed) as f64);
        let pool = &self.engine.kv_pool;
        let used = pool.capacity() - pool.available();
        gauge!(names::KV_CACHE_USAGE).set(used as f64 / pool.capacity().max(1) as f64);
        gauge!(names::PREFIX_CACHE_BLOCKS).set(pool.cached() as f64);
    }

    fn admit(&mut self, (s, submitted): (Submission, Instant)) {
        self.load.queued.fetch_sub(1, Ordering::Relaxed);
        histogram!(names::QUEUE_TIME).record(submitted.elapsed().as_secs_f64());
        match self.engine.start_with(s.request, s.controls) {
            Ok(mut seq) => {
                if let Some(c) = s.constraint {
                    seq.constrain(c);
                }
                let cached_tokens = seq.cached_tokens();
                let started = Event::Started { prompt_ids: seq.request.prompt_ids.clone(), cached_tokens };
                counter!(names::PROMPT_TOKENS).increment(seq.request.prompt_ids.len() as u64);
                if self.engine.kv_pool.prefix_caching() {
                    counter!(names::PREFIX_CACHE_QUERIES).increment(seq.request.prompt_ids.len() as u64);
                    counter!(names::PREFIX_CACHE_HITS).increment(cached_tokens as u64);
                }
                if s.events.send(Ok(started)).is_ok() {
                    self.running.push(Running {
                        seq,
                        events: s.events,
                        tenant: s.tenant,
                        span: s.span,
                        submitted,
                        last_token: None,
                    });
                }
            }
            Err(e) => {
                let _ = s.events.send(Err(ServeError::Invalid(Arc::new(e))));
            }
        }
    }

    /// Runs one engine step and reports its tokens; `Err` with the cause if the device
    /// faulted (the caller stops the engine).
    fn step(&mut self) -> Result<(), String> {
        self.steps += 1;
        if self.faults.panic_at_step == Some(self.steps) {
            panic!("injected fault at step {}", self.steps);
        }
        // A step serves every running request; it is traced under the oldest one.
        let step = tracing::info_span!(parent: &self.running[0].span, "engine_step", batch = self.running.len());
        let _entered = step.enter();
        let mut seqs: Vec<&mut Sequence> = self.running.iter_mut().map(|r| &mut r.seq).collect();
        match self.engine.step(&mut seqs, MAX_DISPATCH_TOKENS) {
            Ok(tokens) => {
                let now = Instant::now();
                for (r, token) in self.running.iter_mut().zip(tokens) {
                    if let Some(p) = r.seq.take_prompt_logprobs() {
                        let _ = r.events.send(Ok(Event::PromptLogprobs(p)));
                    }
                    if let Some(t) = token {
                        counter!(names::GENERATION_TOKENS).increment(1);
                        match r.last_token {
                            None => histogram!(names::TIME_TO_FIRST_TOKEN).record((now - r.submitted).as_secs_f64()),
                            Some(last) => histogram!(names::INTER_TOKEN_LATENCY).record((now - last).as_secs_f64()),
                        }
                        r.last_token = Some(now);
                        let _ = r.events.send(Ok(Event::Token(t)));
                    }
                    if let Some(failure) = &r.seq.failure {
                        counter!(names::REQUESTS, "finished_reason" => "abort").increment(1);
                        let _ = r.events.send(Err(ServeError::GrammarFailed(failure.clone())));
                    } else if let Some(reason) = r.seq.finish_reason {
                        histogram!(names::E2E_LATENCY).record((now - r.submitted).as_secs_f64());
                        counter!(names::REQUESTS, "finished_reason" => reason.as_str()).increment(1);
                        let _ = r.events.send(Ok(Event::Finished(reason)));
                    }
                }
                self.running.retain(|r| !r.seq.is_finished());
            }
            Err(e) => {
                // The step left every sequence as it was, but without the experts it needs
                // it cannot go on: fail the affected requests rather than leave them hanging.
                tracing::error!(error = %e, requests = self.running.len(), "step failed");
                if e.is_device_fault() {
                    return Err(e.to_string());
                }
                let err = match e {
                    ModelError::ExpertUnavailable { .. } => ServeError::ExpertsUnavailable(Arc::new(e)),
                    e => ServeError::StepFailed(Arc::new(e)),
                };
                for r in self.running.drain(..) {
                    let _ = r.events.send(Err(err.clone()));
                }
            }
        }
        Ok(())
    }
}
