//! [`Client`]: how expert nodes, routers and the CLI talk to the coordinator group. Any member
//! answers (followers forward to the leader); the client remembers the member that last
//! answered and moves on to the next one when a member is down or has no leader yet.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use switchyard_proto::tls::{Role, Security};
use switchyard_proto::v1::coordinator_client::CoordinatorClient;
use switchyard_proto::v1::{
    BudgetGrant, BudgetRefund, BudgetRequest, ChangeMembersRequest, CoordinatorStatus, CoordinatorStatusRequest,
    DrainNodeRequest, LoadReport, NodeHeartbeat, Placement, RegisterNodeRequest, SetTenantsRequest, Tenant,
    WatchPlacementRequest,
};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::convert::{active, newest_epoch};

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(300);
/// Between rounds over all members, when none answered.
const RETRY_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    addresses: Vec<String>,
    channels: Vec<Channel>,
    preferred: AtomicUsize,
}

impl Client {
    /// A client of the members at `addresses` (`host:port`), connecting with `security` (a
    /// member must present a coordinator certificate); connects lazily.
    pub fn new(addresses: &[String], security: &Security) -> Result<Self, String> {
        if addresses.is_empty() {
            return Err("no coordinator addresses given".into());
        }
        let channels = addresses
            .iter()
            .map(|a| {
                security
                    .endpoint(a, Role::Coordinator)
                    .map(|e| {
                        e.connect_timeout(Duration::from_secs(1))
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(1))
                            .keep_alive_timeout(Duration::from_secs(2))
                            .connect_lazy()
                    })
                    .map_err(|e| format!("coordinator {a:?}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Client {
            inner: Arc::new(Inner { addresses: addresses.to_vec(), channels, preferred: AtomicUsize::new(0) }),
        })
    }

    pub fn addresses(&self) -> &[String] {
        &self.inner.addresses
    }

    /// Calls `f` on the preferred member, then each other one, until one answers with anything
    /// but "unavailable"; makes `rounds` such rounds.
    async fn call<T, F, Fut>(&self, rounds: usize, f: F) -> Result<T, Status>
    where
        F: Fn(CoordinatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.inner.channels.len();
        let mut last = Status::unavailable("no coordinator tried");
        for round in 0..rounds.max(1) {
            if round > 0 {
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
            let start = self.inner.preferred.load(Ordering::Relaxed);
            for i in 0..n {
                let at = (start + i) % n;
                let client = CoordinatorClient::new(self.inner.channels[at].clone());
                match tokio::time::timeout(CALL_TIMEOUT, f(client)).await {
                    Ok(Ok(response)) => {
                        self.inner.preferred.store(at, Ordering::Relaxed);
                        return Ok(response.into_inner());
                    }
                    Ok(Err(status)) if status.code() != Code::Unavailable && status.code() != Code::Unknown => {
                        return Err(status);
                    }
                    Ok(Err(status)) => {
                        last = Status::unavailable(format!(
                            "coordinator {}: {}",
                            self.inner.addresses[at],
                            switchyard_proto::error_chain(&status)
                        ))
                    }
                    Err(_) => {
                        last = Status::unavailable(format!("coordinator {} did not answer", self.inner.addresses[at]))
                    }
                }
            }
        }
        Err(last)
    }

    pub async fn register(&self, request: RegisterNodeRequest) -> Result<u64, Status> {
        let answer = self.call(50, |mut c| {
            let request = request.clone();
            async move { c.register_node(request).await }
        });
        Ok(answer.await?.node_id)
    }

    /// Returns whether the coordinator still knows the node (false: it must register again).
    /// Each member gets a short time to answer: a heartbeat stuck on a dead member must not
    /// outlast the node timeout.
    pub async fn heartbeat(&self, request: NodeHeartbeat) -> Result<bool, Status> {
        let answer = self.call(1, |mut c| async move {
            let mut request = tonic::Request::new(request);
            request.set_timeout(HEARTBEAT_TIMEOUT);
            tokio::time::timeout(HEARTBEAT_TIMEOUT, c.heartbeat(request))
                .await
                .unwrap_or_else(|_| Err(Status::unavailable("heartbeat timed out")))
        });
        Ok(answer.await?.known)
    }

    pub async fn report_load(&self, request: LoadReport) -> Result<(), Status> {
        self.call(1, |mut c| {
            let request = request.clone();
            async move { c.report_load(request).await }
        })
        .await?;
        Ok(())
    }

    pub async fn status(&self) -> Result<CoordinatorStatus, Status> {
        self.call(10, |mut c| async move { c.status(CoordinatorStatusRequest {}).await }).await
    }

    pub async fn drain(&self, node: String) -> Result<u64, Status> {
        let answer = self.call(10, |mut c| {
            let node = node.clone();
            async move { c.drain_node(DrainNodeRequest { node }).await }
        });
        Ok(answer.await?.node_id)
    }

    /// Adds coordinators (id → address) and removes others, in one configuration change.
    pub async fn change_members(
        &self,
        add: std::collections::HashMap<u64, String>,
        remove: Vec<u64>,
    ) -> Result<(), Status> {
        self.call(10, |mut c| {
            let request = ChangeMembersRequest { add: add.clone(), remove: remove.clone() };
            async move { c.change_members(request).await }
        })
        .await?;
        Ok(())
    }

    /// Replaces the cluster's tenants.
    pub async fn set_tenants(&self, tenants: Vec<Tenant>) -> Result<(), Status> {
        self.call(10, |mut c| {
            let request = SetTenantsRequest { tenants: tenants.clone() };
            async move { c.set_tenants(request).await }
        })
        .await?;
        Ok(())
    }

    /// Takes `requests` and `tokens` from `tenant`'s budget, or says when it has room.
    pub async fn acquire_budget(&self, tenant: &str, requests: u32, tokens: u64) -> Result<BudgetGrant, Status> {
        self.call(2, |mut c| {
            let request = BudgetRequest { tenant: tenant.to_string(), requests, tokens };
            async move { c.acquire_budget(request).await }
        })
        .await
    }

    /// Gives back `tokens` of `tenant`'s budget that a request reserved and did not use.
    pub async fn refund_budget(&self, tenant: &str, tokens: u64) -> Result<(), Status> {
        self.call(2, |mut c| {
            let request = BudgetRefund { tenant: tenant.to_string(), tokens };
            async move { c.refund_budget(request).await }
        })
        .await?;
        Ok(())
    }

    /// Watches the placement: the receiver holds the newest one seen (`None` until the first
    /// arrives). A background task follows the stream of one member and moves to another when
    /// it breaks; a placement older than the one held (from a lagging member) is skipped.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Placement>>> {
        let (tx, rx) = watch::channel(None);
        let client = self.clone();
        tokio::spawn(async move {
            let n = client.inner.channels.len();
            let mut at = client.inner.preferred.load(Ordering::Relaxed);
            loop {
                let mut c = CoordinatorClient::new(client.inner.channels[at % n].clone());
                match c.watch_placement(WatchPlacementRequest {}).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        loop {
                            // Stop following as soon as nobody watches.
                            let placement = tokio::select! {
                                _ = tx.closed() => return,
                                next = stream.message() => match next {
                                    Ok(Some(placement)) => placement,
                                    _ => break,
                                },
                            };
                            // Never back to an older view (a lagging member's): compare the newest
                            // and the active epoch.
                            let version = |p: &Placement| (newest_epoch(p), active(p).map_or(0, |(e, _)| e));
                            let newer =
                                tx.borrow().as_ref().is_none_or(|p: &Arc<Placement>| version(&placement) >= version(p));
                            if newer {
                                tx.send_replace(Some(Arc::new(placement)));
                            }
                        }
                    }
                    Err(status) => {
                        tracing::debug!(coordinator = %client.inner.addresses[at % n], "placement watch: {}", status.message())
                    }
                }
                if tx.is_closed() {
                    return;
                }
                at += 1;
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
        });
        rx
    }
}
