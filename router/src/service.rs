//! The router's gRPC API: `Generate` (server-streaming tokens) and `ClusterStatus`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use switchyard_proto::v1::router_server::Router;
use switchyard_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, ExpertNodeInfo, GenerateRequest, GenerateResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::convert;
use crate::scheduler::{Scheduler, Submission};

pub struct RouterService {
    pub scheduler: Scheduler,
    pub cluster: Arc<Cluster>,
    pub model_type: &'static str,
    pub epoch: u64,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Router for RouterService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let (prompt, request) = convert::request(request.into_inner())?;
        let (events, rx) = mpsc::unbounded_channel();
        self.scheduler.submit(Submission { prompt, request, events })?;
        let mut rx = UnboundedReceiverStream::new(rx);
        // The first event says whether the request was accepted; a rejection is the call's
        // status rather than an error inside the stream.
        let first = match rx.next().await {
            Some(Ok(started)) => started,
            Some(Err(status)) => return Err(status),
            None => return Err(Status::unavailable("the router is shutting down")),
        };
        let stream = tokio_stream::once(Ok(first)).chain(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cluster_status(&self, _: Request<ClusterStatusRequest>) -> Result<Response<ClusterStatusResponse>, Status> {
        let nodes = self
            .cluster
            .nodes
            .iter()
            .map(|n| {
                let v = n.view();
                ExpertNodeInfo {
                    address: v.address,
                    state: if v.serving { "serving" } else { "unreachable" }.to_string(),
                    experts: v.holds,
                    last_error: v.last_error.unwrap_or_default(),
                    dispatches: v.dispatches,
                    mean_round_trip_micros: v.mean_round_trip_micros,
                    pid: v.pid,
                }
            })
            .collect();
        let load = &self.scheduler.load;
        Ok(Response::new(ClusterStatusResponse {
            model_type: self.model_type.to_string(),
            epoch: self.epoch,
            nodes,
            queued_requests: load.queued.load(Ordering::Relaxed),
            running_requests: load.running.load(Ordering::Relaxed),
        }))
    }
}
