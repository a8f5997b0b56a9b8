//! The gRPC `ExpertService`: a dispatch stream per router, health and status.

use std::pin::Pin;
use std::sync::atomic::Ordering;

use switchyard_proto::v1::expert_service_server::ExpertService;
use switchyard_proto::v1::{
    DispatchError, DispatchRequest, DispatchResponse, HealthRequest, HealthResponse, NodeStatus, StatusRequest,
    dispatch_response,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use switchyard_proto::tls::{Role, Security};

use crate::compute::Compute;

pub struct NodeService {
    pub compute: Compute,
    /// Who may call: routers dispatch; any role of the cluster reads health and status.
    pub security: Security,
    /// Turns true when the node starts shutting down.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

type DispatchStream = Pin<Box<dyn Stream<Item = Result<DispatchResponse, Status>> + Send>>;

/// Dispatches a stream keeps in flight before it stops reading new ones.
const IN_FLIGHT: usize = 64;

#[tonic::async_trait]
impl ExpertService for NodeService {
    type DispatchStream = DispatchStream;

    async fn dispatch(
        &self,
        request: Request<Streaming<DispatchRequest>>,
    ) -> Result<Response<Self::DispatchStream>, Status> {
        self.security.authorize(&request, "Dispatch", &[Role::Router])?;
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<DispatchResponse, Status>>(IN_FLIGHT);
        let compute = self.compute.clone();
        let mut stopping = self.stopping.clone();
        tracing::debug!(?peer, "dispatch stream opened");
        tokio::spawn(async move {
            // The stream's dispatches in flight: aborted if the router goes away (their
            // answers have nowhere to go), finished first if the node is shutting down.
            let mut tasks = tokio::task::JoinSet::new();
            let mut draining = false;
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = stopping.wait_for(|&s| s) => {
                        draining = true;
                        break;
                    }
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                };
                let req = match next {
                    Ok(Some(req)) => req,
                    Ok(None) => break,
                    Err(status) => {
                        // An undecodable or oversized frame ends the stream with its status;
                        // a router that went away ends it too, which is routine.
                        if status.code() == tonic::Code::Unknown || status.code() == tonic::Code::Cancelled {
                            tracing::debug!(?peer, %status, "dispatch stream ended");
                        } else {
                            tracing::warn!(?peer, %status, "dispatch stream failed");
                        }
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                if tasks.len() >= IN_FLIGHT {
                    // Back-pressure: stop reading until one finishes.
                    tasks.join_next().await;
                }
                let (compute, tx) = (compute.clone(), tx.clone());
                // The router's dispatch span is the parent, across the process boundary.
                let span = tracing::info_span!(
                    "expert_compute",
                    otel.kind = "server",
                    layer = req.layer,
                    tokens = req.activations.as_ref().and_then(|t| t.shape.first().copied()).unwrap_or(0)
                );
                let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&req.trace_context));
                let _ = span.set_parent(parent);
                tasks.spawn(async move {
                    let id = req.id;
                    let response = match compute.run(req, span).await {
                        Ok((partial, took)) => DispatchResponse {
                            id,
                            result: Some(dispatch_response::Result::Partial(partial)),
                            compute_micros: took.as_micros() as u64,
                        },
                        Err(e) => {
                            tracing::warn!(?peer, error = %e, "dispatch rejected");
                            let status = Status::from(e);
                            DispatchResponse {
                                id,
                                result: Some(dispatch_response::Result::Error(DispatchError {
                                    code: status.code() as i32,
                                    message: status.message().to_string(),
                                })),
                                compute_micros: 0,
                            }
                        }
                    };
                    let _ = tx.send(Ok(response)).await;
                });
            }
            if draining {
                while tasks.join_next().await.is_some() {}
            }
            tracing::debug!(?peer, "dispatch stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn health(&self, request: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        self.security.authorize(&request, "Health", &Role::ALL)?;
        Ok(Response::new(HealthResponse { state: self.compute.health.serving_state() as i32 }))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<NodeStatus>, Status> {
        self.security.authorize(&request, "Status", &Role::ALL)?;
        let catalog = self.compute.catalog();
        let spec = catalog.spec();
        let stats = &self.compute.stats;
        let held = self.compute.held.borrow().clone();
        Ok(Response::new(NodeStatus {
            state: self.compute.health.serving_state() as i32,
            model_type: catalog.model_type().to_string(),
            num_layers: spec.num_layers as u32,
            num_experts: spec.num_experts as u32,
            hidden_size: spec.hidden_size as u32,
            experts: held.ids,
            expert_bytes: held.bytes as u64,
            memory_budget: catalog.budget().unwrap_or(0) as u64,
            dispatches: stats.dispatches.load(Ordering::Relaxed),
            routed_tokens: stats.routed_tokens.load(Ordering::Relaxed),
            epoch: stats.epoch.load(Ordering::Relaxed),
            pid: std::process::id(),
        }))
    }
}
