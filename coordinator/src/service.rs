//! The gRPC `Coordinator` service. Raft traffic goes straight to the raft thread. What only
//! the leader can do (proposals, heartbeats, load reports) a follower forwards to the leader
//! once; a forwarded call that lands on a non-leader is refused with the leader it knows.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::tls::{self, Caller, Role, Roles, Security};
use switchyard_proto::v1::coordinator_client::CoordinatorClient;
use switchyard_proto::v1::coordinator_server::Coordinator;
use switchyard_proto::v1::{
    BudgetAck, BudgetGrant, BudgetRefund, BudgetRequest, ChangeMembersRequest, ChangeMembersResponse,
    CoordinatorMember, CoordinatorStatus, CoordinatorStatusRequest, DrainNodeRequest, DrainNodeResponse, HeartbeatAck,
    LoadAck, LoadReport, NodeHeartbeat, NodeLoad, Placement, RaftAck, RaftBatch, RegisterNodeRequest,
    RegisterNodeResponse, SetTenantsRequest, SetTenantsResponse, WatchPlacementRequest,
};
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::error::CoordinatorError;
use crate::node::{Handle, Load, Msg, View};
use crate::peer::decode_message;
use crate::state::{Command, Outcome};

/// Marks a call a follower forwarded, so it is forwarded at most once.
const FORWARDED: &str = "switchyard-forwarded";

/// On a forwarded call: the roles and certificate fingerprint of the original caller, which
/// the follower authenticated. Believed only from a coordinator's connection.
const CALLER_ROLES: &str = "switchyard-caller-roles";
const CALLER_FINGERPRINT: &str = "switchyard-caller-fingerprint";

/// Who may make each call (with mutual TLS; in plaintext, anyone).
const ANY: &[Role] = &Role::ALL;
const MEMBERS: &[Role] = &[Role::Coordinator];
const NODES: &[Role] = &[Role::Node];
const ROUTERS: &[Role] = &[Role::Router];
/// A router drains a node whose answers it refused (see the router's canary checks).
const DRAINERS: &[Role] = &[Role::Admin, Role::Router];
const ADMINS: &[Role] = &[Role::Admin];

/// The metadata key carrying the members' shared raft token.
pub const RAFT_TOKEN: &str = "switchyard-raft-token";

pub struct CoordinatorService {
    handle: Handle,
    security: Security,
    raft_token: Option<String>,
    /// Turns true when the coordinator shuts down: watch streams end so the server can stop.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// A channel to the leader, by address.
    leader: Mutex<Option<(String, Channel)>>,
    /// The tenants' per-minute budgets, while this member leads.
    budgets: crate::tenants::Budgets,
}

impl CoordinatorService {
    pub fn new(
        handle: Handle,
        security: Security,
        raft_token: Option<String>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        CoordinatorService {
            handle,
            security,
            raft_token,
            stopping,
            leader: Mutex::new(None),
            budgets: crate::tenants::Budgets::default(),
        }
    }

    /// Who made `request` (for a call a member forwarded, the member's original caller) if it
    /// may make `call`.
    fn authorize<T>(&self, request: &Request<T>, call: &str, allowed: &[Role]) -> Result<Caller, Status> {
        let direct = self.security.caller(request)?;
        let metadata = request.metadata();
        let caller = match (&direct, metadata.get(FORWARDED), metadata.get(CALLER_ROLES)) {
            (Caller::Certified { .. }, Some(_), Some(roles)) if direct.is(Role::Coordinator) => {
                let roles = roles.to_str().ok().and_then(|r| r.parse().ok()).map(Roles::from_bits);
                let fingerprint = metadata.get(CALLER_FINGERPRINT).and_then(|f| f.to_str().ok());
                match (roles, fingerprint) {
                    (Some(roles), Some(f)) => Caller::Certified { roles, fingerprint: f.to_string() },
                    _ => return Err(Status::invalid_argument("a forwarded call's caller metadata is malformed")),
                }
            }
            _ => direct,
        };
        tls::check(&caller, call, allowed)?;
        Ok(caller)
    }

    fn view(&self) -> Arc<View> {
        self.handle.view.borrow().clone()
    }

    /// The leader's client if this member is not the leader (`None`: handle it here).
    fn leader_client(&self, metadata: &MetadataMap) -> Result<Option<CoordinatorClient<Channel>>, Status> {
        let view = self.view();
        if view.is_leader() {
            return Ok(None);
        }
        let Some((_, address)) = view.leader().filter(|_| metadata.get(FORWARDED).is_none()) else {
            return Err(CoordinatorError::NotLeader { leader: view.leader() }.into());
        };
        let mut cached = self.leader.lock().expect("leader lock");
        let channel = match &*cached {
            Some((a, channel)) if *a == address => channel.clone(),
            _ => {
                let endpoint = self
                    .security
                    .endpoint(&address, Role::Coordinator)
                    .map_err(|e| Status::internal(format!("leader {address}: {e}")))?
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(Duration::from_secs(5));
                let channel = endpoint.connect_lazy();
                *cached = Some((address, channel.clone()));
                channel
            }
        };
        Ok(Some(CoordinatorClient::new(channel)))
    }
}

/// `inner`, marked as forwarded on behalf of `caller`.
fn forwarded<T>(inner: T, caller: &Caller) -> Request<T> {
    let mut request = Request::new(inner);
    let metadata = request.metadata_mut();
    metadata.insert(FORWARDED, "1".parse().expect("ascii"));
    if let Caller::Certified { roles, fingerprint } = caller {
        metadata.insert(CALLER_ROLES, roles.bits().to_string().parse().expect("ascii"));
        if let Ok(f) = fingerprint.parse() {
            metadata.insert(CALLER_FINGERPRINT, f);
        }
    }
    request
}

type PlacementStream = Pin<Box<dyn Stream<Item = Result<Placement, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn raft(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        self.security.authorize(&request, "Raft", MEMBERS)?;
        if let Some(token) = &self.raft_token {
            let given = request.metadata().get(RAFT_TOKEN).map_or(&[][..], |v| v.as_bytes());
            if !switchyard_proto::server::same_secret(given, token.as_bytes()) {
                return Err(Status::permission_denied("raft traffic needs the members' raft token"));
            }
        }
        for bytes in request.into_inner().messages {
            let message = decode_message(&bytes)
                .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            self.handle.send(Msg::Raft(message))?;
        }
        Ok(Response::new(RaftAck {}))
    }

    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let caller = self.authorize(&request, "RegisterNode", NODES)?;
        if let Some(mut leader) = self.leader_client(request.metadata())? {
            return leader.register_node(forwarded(request.into_inner(), &caller)).await;
        }
        let owner = caller.fingerprint().map(str::to_string);
        let r = request.into_inner();
        let model = r.model.as_ref().ok_or_else(|| Status::invalid_argument("register: `model` is missing"))?;
        if r.address.is_empty() {
            return Err(Status::invalid_argument("register: `address` is empty"));
        }
        if model.moe_layers.is_empty() || model.num_experts == 0 || model.expert_bytes == 0 {
            return Err(Status::invalid_argument(format!(
                "register: the model has no experts to place ({} MoE layers, {} experts, {} bytes each)",
                model.moe_layers.len(),
                model.num_experts,
                model.expert_bytes
            )));
        }
        let budget = if r.memory_budget == 0 { u64::MAX } else { r.memory_budget };
        let command = Command::RegisterNode { address: r.address, budget, model: model.into(), owner };
        match self.handle.propose(command).await? {
            Outcome::Node(node_id) => Ok(Response::new(RegisterNodeResponse { node_id })),
            other => Err(Status::internal(format!("register answered {other:?}"))),
        }
    }

    async fn heartbeat(&self, request: Request<NodeHeartbeat>) -> Result<Response<HeartbeatAck>, Status> {
        let caller = self.authorize(&request, "Heartbeat", NODES)?;
        if let Some(mut leader) = self.leader_client(request.metadata())? {
            return leader.heartbeat(forwarded(request.into_inner(), &caller)).await;
        }
        let h = request.into_inner();
        // A node heartbeats only as itself: the certificate it registered with.
        let owner = self.view().state.nodes.get(&h.node_id).and_then(|n| n.owner.clone());
        if let Some(owner) = owner
            && caller.fingerprint() != Some(owner.as_str())
        {
            return Err(Status::permission_denied(format!(
                "expert node {} registered with another certificate: a node heartbeats only as itself",
                h.node_id
            )));
        }
        let known = self.handle.heartbeat(h.node_id, h.loaded_epoch, h.held_bytes).await?;
        Ok(Response::new(HeartbeatAck { known }))
    }

    async fn report_load(&self, request: Request<LoadReport>) -> Result<Response<LoadAck>, Status> {
        let caller = self.authorize(&request, "ReportLoad", ROUTERS)?;
        if let Some(mut leader) = self.leader_client(request.metadata())? {
            return leader.report_load(forwarded(request.into_inner(), &caller)).await;
        }
        let r = request.into_inner();
        self.handle.send(Msg::Load(Load {
            router: r.router,
            epoch: r.epoch,
            experts: r.experts.iter().map(|x| ((x.layer, x.expert), x.tokens)).collect(),
            node_rows: r.node_rows.into_iter().collect(),
        }))?;
        Ok(Response::new(LoadAck {}))
    }

    type WatchPlacementStream = PlacementStream;

    async fn watch_placement(
        &self,
        request: Request<WatchPlacementRequest>,
    ) -> Result<Response<PlacementStream>, Status> {
        self.authorize(&request, "WatchPlacement", ANY)?;
        let mut views = self.handle.view.clone();
        let mut stopping = self.stopping.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<Placement> = None;
            loop {
                let placement = convert::placement(&views.borrow_and_update().state);
                if last.as_ref() != Some(&placement) {
                    if tx.send(Ok(placement.clone())).await.is_err() {
                        return;
                    }
                    last = Some(placement);
                }
                tokio::select! {
                    changed = views.changed() => if changed.is_err() { return },
                    _ = stopping.wait_for(|&s| s) => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn drain_node(&self, request: Request<DrainNodeRequest>) -> Result<Response<DrainNodeResponse>, Status> {
        let caller = self.authorize(&request, "DrainNode", DRAINERS)?;
        if let Some(mut leader) = self.leader_client(request.metadata())? {
            return leader.drain_node(forwarded(request.into_inner(), &caller)).await;
        }
        let name = request.into_inner().node;
        let view = self.view();
        let node = view
            .state
            .nodes
            .iter()
            .find(|(id, r)| id.to_string() == name || r.address == name)
            .map(|(&id, _)| id)
            .ok_or_else(|| Status::not_found(format!("no expert node has id or address {name:?}")))?;
        self.handle.propose(Command::Drain { node }).await?;
        Ok(Response::new(DrainNodeResponse { node_id: node }))
    }

    async fn change_members(
        &self,
        request: Request<ChangeMembersRequest>,
    ) -> Result<Response<ChangeMembersResponse>, Status> {
        let caller = self.authorize(&request, "ChangeMembers", ADMINS)?;
        if let Some(mut leader) = self.leader_client(request.metadata())? {
            return leader.change_members(forwarded(request.into_inner(), &caller)).await;
        }
        let r = request.into_inner();
        if r.add.len() + r.remove.len() != 1 {
            return Err(Status::invalid_argument(format!(
                "a membership change adds or removes one coordinator at a time (got {} to add, {} to remove): \
                 a group whose majority is not yet running stops deciding",
                r.add.len(),
                r.remove.len()
            )));
        }
        for (id, address) in &r.add {
            answers(*id, address, &self.security).await?;
        }
        self.handle.change_members(r.add.into_iter().collect(), r.remove).await?;
        Ok(Response::new(ChangeMembersResponse {}))
    }

    async fn set_tenants(&self, request: Request<SetTenantsRequest>) -> Result<Response<SetTenantsResponse>, Status> {
        let caller = self.authorize(&request, "SetTenants", ADMINS)?;
        if let Some(mut leader) = self.leader_client(request.metadata())? {
            return leader.set_tenants(forwarded(request.into_inner(), &caller)).await;
        }
        let tenants: Vec<_> = request.into_inner().tenants.iter().map(convert::tenant_spec).collect();
        crate::tenants::validate(&tenants).map_err(Status::invalid_argument)?;
        self.handle.propose(Command::SetTenants { tenants }).await?;
        Ok(Response::new(SetTenantsResponse {}))
    }

    async fn acquire_budget(&self, request: Request<BudgetRequest>) -> Result<Response<BudgetGrant>, Status> {
        let caller = self.authorize(&request, "AcquireBudget", ROUTERS)?;
        if let Some(mut leader) = self.leader_client(request.metadata())? {
            return leader.acquire_budget(forwarded(request.into_inner(), &caller)).await;
        }
        let r = request.into_inner();
        let view = self.view();
        let spec = view
            .state
            .tenants
            .iter()
            .find(|t| t.name == r.tenant)
            .ok_or_else(|| Status::not_found(format!("no tenant is named `{}`", r.tenant)))?;
        let grant = match self.budgets.acquire(spec, r.requests, r.tokens) {
            Ok(()) => BudgetGrant { granted: true, retry_after_seconds: 0.0, limit: String::new() },
            Err(short) => {
                BudgetGrant { granted: false, retry_after_seconds: short.retry_after_seconds, limit: short.limit }
            }
        };
        Ok(Response::new(grant))
    }

    async fn refund_budget(&self, request: Request<BudgetRefund>) -> Result<Response<BudgetAck>, Status> {
        let caller = self.authorize(&request, "RefundBudget", ROUTERS)?;
        if let Some(mut leader) = self.leader_client(request.metadata())? {
            return leader.refund_budget(forwarded(request.into_inner(), &caller)).await;
        }
        let r = request.into_inner();
        self.budgets.refund(&r.tenant, r.tokens);
        Ok(Response::new(BudgetAck {}))
    }

    async fn status(&self, request: Request<CoordinatorStatusRequest>) -> Result<Response<CoordinatorStatus>, Status> {
        // The leader answers after a ReadIndex round (current, with its load figures); a
        // follower asks the leader, and answers from what it has applied when no leader
        // answers in time (during an election, say).
        let caller = self.authorize(&request, "Status", ANY)?;
        match self.leader_client(request.metadata()) {
            Ok(None) => {
                if let Ok(view) = self.handle.read().await {
                    return Ok(Response::new(status(&view)));
                }
            }
            Ok(Some(mut leader)) => {
                let mut forward = forwarded(CoordinatorStatusRequest {}, &caller);
                forward.set_timeout(FORWARD_STATUS_TIMEOUT);
                if let Ok(Ok(answer)) = tokio::time::timeout(FORWARD_STATUS_TIMEOUT, leader.status(forward)).await {
                    return Ok(answer);
                }
            }
            Err(_) => {}
        }
        Ok(Response::new(status(&self.view())))
    }
}

/// Checks that coordinator `id` runs at `address` (started with `--join`) before the group
/// counts it in its majority: a voter that is not there would take the quorum with it.
async fn answers(id: u64, address: &str, security: &Security) -> Result<(), Status> {
    let unreachable = |why: String| {
        Status::failed_precondition(format!(
            "coordinator {id} does not answer at {address} ({why}): start it with `switchyard coordinator --join` first"
        ))
    };
    let endpoint = security
        .endpoint(address, Role::Coordinator)
        .map_err(|e| Status::invalid_argument(format!("coordinator {id}: {e}")))?
        .connect_timeout(MEMBER_CHECK_TIMEOUT)
        .timeout(MEMBER_CHECK_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| unreachable(switchyard_proto::error_chain(&e)))?;
    let status = CoordinatorClient::new(channel)
        .status(forwarded(CoordinatorStatusRequest {}, &Caller::Unauthenticated))
        .await
        .map_err(|e| unreachable(e.message().to_string()))?
        .into_inner();
    if status.id != id {
        return Err(Status::failed_precondition(format!("{address} is coordinator {}, not {id}", status.id)));
    }
    Ok(())
}

/// How long a new member has to answer before it is added.
const MEMBER_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a follower waits for the leader's status before answering from its own state.
const FORWARD_STATUS_TIMEOUT: Duration = Duration::from_millis(500);

fn status(view: &View) -> CoordinatorStatus {
    CoordinatorStatus {
        id: view.id,
        leader_id: view.leader_id,
        term: view.term,
        commit_index: view.commit,
        applied_index: view.applied,
        members: view
            .voters
            .iter()
            .map(|&id| CoordinatorMember { id, address: view.state.members.get(&id).cloned().unwrap_or_default() })
            .collect(),
        placement: Some(convert::placement(&view.state)),
        load: view
            .node_load
            .keys()
            .chain(view.node_bytes.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|&node_id| NodeLoad {
                node_id,
                rows_per_second: view.node_load.get(&node_id).copied().unwrap_or(0.0),
                held_bytes: view.node_bytes.get(&node_id).copied().unwrap_or(0),
            })
            .collect(),
        imbalance: view.imbalance(),
        pid: std::process::id(),
    }
}
