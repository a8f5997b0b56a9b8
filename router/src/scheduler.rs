//! The engine thread: owns the [`Engine`] and every running [`Sequence`]. Each step runs the
//! running sequences' next tokens together with the next chunks of newly admitted prompts;
//! requests join at the next step and leave as soon as they finish or their client goes.
//! The gRPC side holds a [`Scheduler`] handle and reads each request's events from a channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use metrics::{counter, gauge, histogram};

use switchyard_model::engine::GeneratedToken;
use switchyard_model::kv_cache::{BLOCK_TOKENS, blocks_for};
use switchyard_model::{Engine, FinishReason, GenerateRequest, ModelError, Sequence};
use switchyard_proto::MAX_DISPATCH_TOKENS;

use crate::metric_names as names;
use tokio::sync::mpsc;

/// What happens to a request, in order: `Started`, a `Token` per generated token, `Finished`;
/// or an error at any point, after which nothing follows.
#[derive(Debug)]
pub enum Event {
    Started { prompt_ids: Vec<u32> },
    Token(GeneratedToken),
    Finished(FinishReason),
}

/// Why a request was refused or failed; each front end maps it to its own status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    /// The request itself is wrong (names the field or value).
    #[error("{0}")]
    Invalid(String),
    /// Too much queued; retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The cluster cannot serve it now (no reachable replica, shutting down).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

pub type Events = mpsc::UnboundedSender<Result<Event, ServeError>>;

/// One request handed to the engine thread (prompt already tokenized); its events go to
/// `events`, the first being `Started` or an error. Dropping the receiver cancels it.
pub struct Submission {
    pub request: GenerateRequest,
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

#[derive(Clone)]
pub struct Scheduler {
    submissions: mpsc::UnboundedSender<(Submission, Instant)>,
    pub load: Arc<Load>,
    max_queue: usize,
}

impl Scheduler {
    /// Starts the engine thread; at most `max_batch` sequences run at once and at most
    /// `max_queue` wait.
    pub fn start(engine: Engine, max_batch: usize, max_queue: usize) -> std::io::Result<Self> {
        let (submissions, rx) = mpsc::unbounded_channel::<(Submission, Instant)>();
        let load = Arc::new(Load::default());
        let counters = load.clone();
        std::thread::Builder::new().name("router-engine".into()).spawn(move || {
            let engine_loop = EngineLoop {
                engine,
                max_batch: max_batch.max(1),
                load: counters,
                running: Vec::new(),
                waiting: Vec::new(),
            };
            engine_loop.run(rx)
        })?;
        Ok(Scheduler { submissions, load, max_queue: max_queue.max(1) })
    }

    /// Queues `s`, or refuses it when the queue is full or the engine has stopped.
    pub fn submit(&self, s: Submission) -> Result<(), ServeError> {
        // Counted before sending: the engine thread may admit it (and count it out) at once.
        if self.load.queued.fetch_add(1, Ordering::Relaxed) as usize >= self.max_queue {
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ServeError::Overloaded(format!(
                "the router's request queue is full ({} waiting); retry later",
                self.max_queue
            )));
        }
        self.submissions.send((s, Instant::now())).map_err(|_| {
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
            ServeError::Unavailable("the router is shutting down".into())
        })?;
        gauge!(names::WAITING).set(self.load.queued.load(Ordering::Relaxed) as f64);
        Ok(())
    }
}

struct EngineLoop {
    engine: Engine,
    max_batch: usize,
    load: Arc<Load>,
    running: Vec<Running>,
    /// Submitted, not yet admitted, oldest first.
    waiting: Vec<(Submission, Instant)>,
}

impl EngineLoop {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<(Submission, Instant)>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.blocking_recv() {
                    Some(s) => self.waiting.push(s),
                    None => return,
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
                if let Err(e) = self.engine.validate(&self.waiting[i].0.request) {
                    let (s, _) = self.waiting.remove(i);
                    self.load.queued.fetch_sub(1, Ordering::Relaxed);
                    let _ = s.events.send(Err(ServeError::Invalid(e.to_string())));
                    continue;
                }
                if let Some(pool) = &self.engine.kv_pool {
                    let need = blocks_for(Engine::kv_tokens(&self.waiting[i].0.request));
                    if need > pool.capacity() {
                        let (s, _) = self.waiting.remove(i);
                        self.load.queued.fetch_sub(1, Ordering::Relaxed);
                        let _ = s.events.send(Err(ServeError::Invalid(format!(
                            "prompt + max_tokens need {need} KV-cache blocks of {BLOCK_TOKENS} tokens but the whole cache \
                             has {}; lower max_tokens or raise --kv-cache-memory",
                            pool.capacity()
                        ))));
                        continue;
                    }
                    if need > pool.available() {
                        break; // waits until running sequences give blocks back
                    }
                }
                let next = self.waiting.remove(i);
                self.admit(next);
            }
            self.publish();
            if !self.running.is_empty() {
                self.step();
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
        if let Some(pool) = &self.engine.kv_pool {
            let used = pool.capacity() - pool.available();
            gauge!(names::KV_CACHE_USAGE).set(used as f64 / pool.capacity().max(1) as f64);
        }
    }

    fn admit(&mut self, (s, submitted): (Submission, Instant)) {
        self.load.queued.fetch_sub(1, Ordering::Relaxed);
        histogram!(names::QUEUE_TIME).record(submitted.elapsed().as_secs_f64());
        match self.engine.start(s.request) {
            Ok(seq) => {
                let started = Event::Started { prompt_ids: seq.request.prompt_ids.clone() };
                counter!(names::PROMPT_TOKENS).increment(seq.request.prompt_ids.len() as u64);
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
                let _ = s.events.send(Err(ServeError::Invalid(e.to_string())));
            }
        }
    }

    fn step(&mut self) {
        // A step serves every running request; it is traced under the oldest one.
        let step = tracing::info_span!(parent: &self.running[0].span, "engine_step", batch = self.running.len());
        let _entered = step.enter();
        let mut seqs: Vec<&mut Sequence> = self.running.iter_mut().map(|r| &mut r.seq).collect();
        match self.engine.step(&mut seqs, MAX_DISPATCH_TOKENS) {
            Ok(tokens) => {
                let now = Instant::now();
                for (r, token) in self.running.iter_mut().zip(tokens) {
                    if let Some(t) = token {
                        counter!(names::GENERATION_TOKENS).increment(1);
                        match r.last_token {
                            None => histogram!(names::TIME_TO_FIRST_TOKEN).record((now - r.submitted).as_secs_f64()),
                            Some(last) => histogram!(names::INTER_TOKEN_LATENCY).record((now - last).as_secs_f64()),
                        }
                        r.last_token = Some(now);
                        let _ = r.events.send(Ok(Event::Token(t)));
                    }
                    if let Some(reason) = r.seq.finish_reason {
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
                let err = match &e {
                    ModelError::ExpertUnavailable { .. } => ServeError::Unavailable(e.to_string()),
                    _ => ServeError::Internal(e.to_string()),
                };
                for r in self.running.drain(..) {
                    let _ = r.events.send(Err(err.clone()));
                }
            }
        }
    }
}
