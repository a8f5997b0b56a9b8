//! The compute thread: owns the [`ExpertStore`] and runs its jobs one after another on its own
//! thread (its products fan out on a rayon pool), never on the async runtime's workers —
//! dispatches, and placements, whose experts are read from the checkpoint beforehand so a
//! placement holds dispatches up only while it copies them to the device.
//!
//! The thread is supervised: a panic or a device fault inside a job is caught, logged with its
//! cause, and stops the thread; [`Health`] then says NOT_SERVING, the heartbeats stop (so the
//! coordinators declare the node dead and re-place its experts), and every dispatch still
//! queued or arriving is answered UNAVAILABLE, which makes routers use another replica.

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use switchyard_kernels::KernelError;
use switchyard_proto::v1::{DispatchRequest, ServingState, Tensor};
use tokio::sync::{oneshot, watch};

use crate::error::NodeError;
use crate::store::{Catalog, ExpertStore, Held};

/// Counters the status RPC reports.
#[derive(Default)]
pub struct Stats {
    pub dispatches: AtomicU64,
    pub routed_tokens: AtomicU64,
    /// The highest placement epoch seen.
    pub epoch: AtomicU64,
}

/// Whether the node serves: NOT_SERVING once it shuts down or its compute thread fails.
#[derive(Debug, Default)]
pub struct Health(Mutex<HealthState>);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HealthState {
    #[default]
    Serving,
    /// Shutting down on request.
    Stopping,
    /// The compute thread failed; the reason.
    Failed(String),
}

impl Health {
    pub fn state(&self) -> HealthState {
        self.0.lock().expect("health lock").clone()
    }

    pub fn serving_state(&self) -> ServingState {
        match self.state() {
            HealthState::Serving => ServingState::Serving,
            HealthState::Stopping | HealthState::Failed(_) => ServingState::NotServing,
        }
    }

    pub fn is_failed(&self) -> bool {
        matches!(self.state(), HealthState::Failed(_))
    }

    pub fn stop(&self) {
        let mut s = self.0.lock().expect("health lock");
        if *s == HealthState::Serving {
            *s = HealthState::Stopping;
        }
    }

    fn fail(&self, reason: String) {
        tracing::error!("the expert node stops serving: {reason}");
        *self.0.lock().expect("health lock") = HealthState::Failed(reason);
    }
}

/// Faults injected for tests (hidden `--fault-*` flags): each makes the node behave as the
/// fault it names would.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Sleep this long before every dispatch (a slow node).
    pub dispatch_delay: Duration,
    /// Panic in the compute thread on this dispatch (1 = the first).
    pub panic_at_dispatch: Option<u64>,
    /// Answer this dispatch (1 = the first) as a device out of memory would.
    pub oom_at_dispatch: Option<u64>,
    /// Add this to every partial sum: a node that answers wrongly without an error (silent
    /// data corruption, or a rogue process).
    pub wrong_answers: Option<f32>,
}

#[allow(clippy::large_enum_variant)] // one per dispatch or placement, moved once into the channel
enum Job {
    Dispatch {
        request: DispatchRequest,
        span: tracing::Span,
        reply: oneshot::Sender<Result<(Tensor, Duration), NodeError>>,
    },
    Place {
        target: BTreeSet<(u32, u32)>,
        loaded: switchyard_model::loader::ExpertWeights,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
}

/// A handle to the compute thread; cheap to clone.
#[derive(Clone)]
pub struct Compute {
    jobs: mpsc::Sender<Job>,
    catalog: Arc<Catalog>,
    /// What the store holds, republished after every placement.
    pub held: watch::Receiver<Held>,
    pub stats: Arc<Stats>,
    pub health: Arc<Health>,
}

impl Compute {
    /// Starts the compute thread, which takes `store` over, with a rayon pool of `threads`
    /// (default: one per core).
    pub fn start(
        store: ExpertStore,
        held: watch::Receiver<Held>,
        threads: Option<usize>,
        faults: Faults,
        health: Arc<Health>,
    ) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let mut pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("expert-compute-{i}"));
        if let Some(n) = threads {
            pool = pool.num_threads(n);
        }
        let pool = pool.build().map_err(std::io::Error::other)?;
        let stats = Arc::new(Stats::default());
        let catalog = store.catalog().clone();
        let worker = Worker { store, stats: stats.clone(), faults, dispatches: 0 };
        let supervisor = health.clone();
        // The job loop itself runs on a pool worker, so each dispatch's products start there
        // without a hop to another thread.
        std::thread::Builder::new().name("expert-dispatch".into()).spawn(move || {
            pool.install(|| worker.run(rx, &supervisor));
        })?;
        Ok(Compute { jobs, catalog, held, stats, health })
    }

    /// The node's model.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    fn unavailable(&self) -> NodeError {
        match self.health.state() {
            HealthState::Failed(why) => NodeError::Failed(why),
            _ => NodeError::ShuttingDown,
        }
    }

    /// Runs one dispatch on the compute thread, under `span`.
    pub async fn run(&self, request: DispatchRequest, span: tracing::Span) -> Result<(Tensor, Duration), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send(Job::Dispatch { request, span, reply }).map_err(|_| self.unavailable())?;
        rx.await.map_err(|_| self.unavailable())?
    }

    /// Makes the store hold exactly `target`: checks it, reads the experts it adds from the
    /// checkpoint (on a blocking thread), then has the compute thread install them.
    pub async fn place(&self, target: BTreeSet<(u32, u32)>) -> Result<(), NodeError> {
        self.catalog.check(&target)?;
        let held = self.held.borrow().set();
        let missing: BTreeSet<(u32, u32)> = target.difference(&held).copied().collect();
        let catalog = self.catalog.clone();
        let loaded = tokio::task::spawn_blocking(move || catalog.read(&missing))
            .await
            .map_err(|e| NodeError::Io(std::io::Error::other(e)))??;
        let (reply, rx) = oneshot::channel();
        self.jobs.send(Job::Place { target, loaded, reply }).map_err(|_| self.unavailable())?;
        rx.await.map_err(|_| self.unavailable())?
    }
}

/// The compute thread's state.
struct Worker {
    store: ExpertStore,
    stats: Arc<Stats>,
    faults: Faults,
    /// Dispatches taken so far (for the injected faults).
    dispatches: u64,
}

impl Worker {
    /// Runs jobs until the handles are gone or a job fails the device.
    fn run(mut self, rx: mpsc::Receiver<Job>, health: &Health) {
        for job in rx {
            match catch_unwind(AssertUnwindSafe(|| self.handle(job))) {
                Ok(None) => {}
                Ok(Some(fault)) => {
                    health.fail(format!("device fault in the compute thread: {fault}"));
                    return;
                }
                Err(panic) => {
                    let why = switchyard_model::error::panic_message(&*panic);
                    health.fail(format!("a panic in the compute thread: {why}"));
                    return;
                }
            }
        }
    }

    /// Runs one job and answers it; returns the error if it is a device fault after which
    /// nothing the device computes can be trusted.
    fn handle(&mut self, job: Job) -> Option<String> {
        match job {
            Job::Dispatch { request, span, reply } => {
                if reply.is_closed() {
                    return None; // its stream is gone: nobody would read the answer
                }
                let start = Instant::now();
                let result = span.in_scope(|| self.dispatch(&request));
                if result.is_ok() {
                    self.stats.dispatches.fetch_add(1, Ordering::Relaxed);
                    self.stats.routed_tokens.fetch_add(request.tokens.len() as u64, Ordering::Relaxed);
                }
                self.stats.epoch.fetch_max(request.epoch, Ordering::Relaxed);
                // After a device fault the node stops serving: the router must take the work
                // elsewhere (UNAVAILABLE), not fail the request.
                let (result, fault) = match result {
                    Err(NodeError::Model(e)) if e.is_device_fault() => {
                        let why = e.to_string();
                        (Err(NodeError::Failed(format!("device fault: {why}"))), Some(why))
                    }
                    other => (other, None),
                };
                // The requester may have gone; its result is then dropped.
                let _ = reply.send(result.map(|t| (t, start.elapsed())));
                fault
            }
            Job::Place { target, loaded, reply } => {
                let result = self.store.install(&target, loaded);
                let fault = match &result {
                    Err(NodeError::Model(e)) if e.is_device_fault() => Some(e.to_string()),
                    _ => None,
                };
                let _ = reply.send(result);
                fault
            }
        }
    }

    fn dispatch(&mut self, request: &DispatchRequest) -> Result<Tensor, NodeError> {
        self.dispatches += 1;
        let f = self.faults;
        if !f.dispatch_delay.is_zero() {
            std::thread::sleep(f.dispatch_delay);
        }
        if f.panic_at_dispatch == Some(self.dispatches) {
            panic!("injected fault at dispatch {}", self.dispatches);
        }
        if f.oom_at_dispatch == Some(self.dispatches) {
            let device = self.store.backend().device();
            let bytes = request.activations.as_ref().map_or(0, |t| t.data.len());
            return Err(KernelError::OutOfMemory { op: "injected fault", device, bytes }.into());
        }
        let mut answer = self.store.dispatch(request)?;
        if let Some(offset) = f.wrong_answers {
            let hidden = self.store.catalog().spec().hidden_size;
            let (sums, _) = switchyard_proto::tensor::to_f32(Some(&answer), "partial sums", hidden)
                .map_err(|e| NodeError::Placement(e.to_string()))?;
            let wrong: Vec<f32> = sums.iter().map(|v| v + offset).collect();
            answer = switchyard_proto::tensor::from_f32(&wrong, hidden);
        }
        Ok(answer)
    }
}
