//! The compute thread: owns the [`ExpertStore`] and runs dispatches one after another on its
//! own thread (its matmuls fan out on a rayon pool), never on the async runtime's workers.
//! The gRPC side holds a [`Compute`] handle and gets each result on a oneshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use switchyard_proto::v1::{DispatchRequest, Tensor};
use tokio::sync::oneshot;

use crate::error::NodeError;
use crate::store::ExpertStore;

/// Counters the status RPC reports.
#[derive(Default)]
pub struct Stats {
    pub dispatches: AtomicU64,
    pub routed_tokens: AtomicU64,
    /// The highest placement epoch seen.
    pub epoch: AtomicU64,
}

struct Job {
    request: DispatchRequest,
    span: tracing::Span,
    reply: oneshot::Sender<Result<(Tensor, Duration), NodeError>>,
}

/// A handle to the compute thread; cheap to clone.
#[derive(Clone)]
pub struct Compute {
    jobs: mpsc::Sender<Job>,
    pub stats: Arc<Stats>,
}

impl Compute {
    /// Starts the compute thread over `store`, with a rayon pool of `threads` (default: one
    /// per core). `delay` is added to every dispatch (fault injection for tests).
    pub fn start(store: Arc<ExpertStore>, threads: Option<usize>, delay: Duration) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let mut pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("expert-compute-{i}"));
        if let Some(n) = threads {
            pool = pool.num_threads(n);
        }
        let pool = pool.build().map_err(std::io::Error::other)?;
        let stats = Arc::new(Stats::default());
        let counters = stats.clone();
        // The job loop itself runs on a pool worker, so each dispatch's matmuls start there
        // without a hop to another thread.
        std::thread::Builder::new().name("expert-dispatch".into()).spawn(move || {
            pool.install(|| {
                for job in rx {
                    if job.reply.is_closed() {
                        continue; // its stream is gone: nobody would read the answer
                    }
                    let start = Instant::now();
                    if !delay.is_zero() {
                        std::thread::sleep(delay);
                    }
                    let result = job.span.in_scope(|| store.dispatch(&job.request));
                    if result.is_ok() {
                        counters.dispatches.fetch_add(1, Ordering::Relaxed);
                        counters.routed_tokens.fetch_add(job.request.tokens.len() as u64, Ordering::Relaxed);
                    }
                    counters.epoch.fetch_max(job.request.epoch, Ordering::Relaxed);
                    // The requester may have gone; its result is then dropped.
                    let _ = job.reply.send(result.map(|t| (t, start.elapsed())));
                }
            })
        })?;
        Ok(Compute { jobs, stats })
    }

    /// Runs one dispatch on the compute thread, under `span`.
    pub async fn run(&self, request: DispatchRequest, span: tracing::Span) -> Result<(Tensor, Duration), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send(Job { request, span, reply }).map_err(|_| NodeError::ShuttingDown)?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }
}
