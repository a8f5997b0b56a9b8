//! The engine thread: owns the [`Engine`] and every running [`Sequence`]. Each step runs the
//! running sequences' next tokens together with the next chunks of newly admitted prompts;
//! requests join at the next step and leave as soon as they finish or their client goes.
//! The gRPC side holds a [`Scheduler`] handle and reads each request's events from a channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use switchyard_model::{Engine, FinishReason, GenerateRequest, ModelError, Sequence};
use switchyard_proto::MAX_DISPATCH_TOKENS;
use switchyard_proto::v1::{self, GenerateResponse, generate_response::Event};
use tokio::sync::mpsc;
use tonic::Status;

use crate::convert;

/// A request's prompt before tokenization.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// One request handed to the engine thread; its events go to `events`, the first being
/// `Started` or an error.
pub struct Submission {
    pub prompt: Prompt,
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedSender<Result<GenerateResponse, Status>>,
}

/// Requests waiting for and running on the engine thread.
#[derive(Default)]
pub struct Load {
    pub queued: AtomicU32,
    pub running: AtomicU32,
}

#[derive(Clone)]
pub struct Scheduler {
    submissions: mpsc::Sender<Submission>,
    pub load: Arc<Load>,
}

impl Scheduler {
    /// Starts the engine thread; at most `max_batch` sequences run at once and at most
    /// `max_queue` wait.
    pub fn start(engine: Engine, max_batch: usize, max_queue: usize) -> std::io::Result<Self> {
        let (submissions, rx) = mpsc::channel(max_queue.max(1));
        let load = Arc::new(Load::default());
        let counters = load.clone();
        std::thread::Builder::new()
            .name("router-engine".into())
            .spawn(move || EngineLoop { engine, max_batch: max_batch.max(1), load: counters, running: Vec::new() }.run(rx))?;
        Ok(Scheduler { submissions, load })
    }

    /// Queues `s`, or refuses it when the queue is full or the engine has stopped.
    pub fn submit(&self, s: Submission) -> Result<(), Status> {
        self.submissions.try_send(s).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Status::resource_exhausted("the router's request queue is full"),
            mpsc::error::TrySendError::Closed(_) => Status::unavailable("the router is shutting down"),
        })?;
        self.load.queued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

type Events = mpsc::UnboundedSender<Result<GenerateResponse, Status>>;

struct EngineLoop {
    engine: Engine,
    max_batch: usize,
    load: Arc<Load>,
    running: Vec<(Sequence, Events)>,
}

fn event(e: Event) -> Result<GenerateResponse, Status> {
    Ok(GenerateResponse { event: Some(e) })
}

impl EngineLoop {
    fn run(mut self, mut rx: mpsc::Receiver<Submission>) {
        loop {
            if self.running.is_empty() {
                match rx.blocking_recv() {
                    Some(s) => self.admit(s),
                    None => return,
                }
            }
            while self.running.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(s) => self.admit(s),
                    Err(_) => break,
                }
            }
            // A client that went away frees its slot.
            self.running.retain(|(_, events)| !events.is_closed());
            self.load.running.store(self.running.len() as u32, Ordering::Relaxed);
            if !self.running.is_empty() {
                self.step();
                self.load.running.store(self.running.len() as u32, Ordering::Relaxed);
            }
        }
    }

    fn admit(&mut self, s: Submission) {
        self.load.queued.fetch_sub(1, Ordering::Relaxed);
        let ids = match s.prompt {
            Prompt::Ids(ids) => Ok(ids),
            Prompt::Text(text) => self.engine.tokenizer().and_then(|t| t.encode(&text)),
        };
        let request = GenerateRequest { prompt_ids: ids.unwrap_or_default(), ..s.request };
        match self.engine.start(request) {
            Ok(seq) => {
                let started = v1::Started { prompt_ids: seq.request.prompt_ids.clone() };
                if s.events.send(event(Event::Started(started))).is_ok() {
                    self.running.push((seq, s.events));
                }
            }
            Err(e) => {
                let _ = s.events.send(Err(Status::invalid_argument(e.to_string())));
            }
        }
    }

    fn step(&mut self) {
        let mut seqs: Vec<&mut Sequence> = self.running.iter_mut().map(|(s, _)| s).collect();
        match self.engine.step(&mut seqs, MAX_DISPATCH_TOKENS) {
            Ok(tokens) => {
                let tokenizer = self.engine.tokenizer.as_ref();
                for ((seq, events), token) in self.running.iter().zip(tokens) {
                    if let Some(t) = token {
                        let _ = events.send(event(Event::Token(convert::token(&t, tokenizer))));
                    }
                    if let Some(reason) = seq.finish_reason {
                        let ids: Vec<u32> = seq.tokens.iter().map(|t| t.id).collect();
                        let text = tokenizer.and_then(|t| t.decode(&ids).ok()).unwrap_or_default();
                        let reason = match reason {
                            FinishReason::Stop => v1::FinishReason::Stop,
                            FinishReason::Length => v1::FinishReason::Length,
                        };
                        let _ = events.send(event(Event::Finished(v1::Finished { reason: reason as i32, text })));
                    }
                }
                self.running.retain(|(s, _)| !s.is_finished());
            }
            Err(e) => {
                // The step left every sequence as it was, but without the experts it needs
                // it cannot go on: fail the affected requests rather than leave them hanging.
                tracing::error!(error = %e, requests = self.running.len(), "step failed");
                let status = match &e {
                    ModelError::ExpertUnavailable { .. } => Status::unavailable(e.to_string()),
                    _ => Status::internal(e.to_string()),
                };
                for (_, events) in self.running.drain(..) {
                    let _ = events.send(Err(status.clone()));
                }
            }
        }
    }
}
