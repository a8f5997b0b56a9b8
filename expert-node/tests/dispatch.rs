//! The expert node's gRPC contract, against a real server on loopback: partial sums equal the
//! in-process experts, and bad dispatches get InvalidArgument / NotFound without breaking the
//! stream or the node.

use std::path::{Path, PathBuf};

use anyhow::Result;
use switchyard_expert_node::{Config, ExpertNode, NodeError};
use switchyard_model::Model;
use switchyard_model::moe::{Assignment, Experts};
use switchyard_proto::tensor;
use switchyard_proto::v1::expert_service_client::ExpertServiceClient;
use switchyard_proto::v1::{
    DispatchRequest, DispatchResponse, Dtype, HealthRequest, ServingState, StatusRequest, dispatch_response,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

fn mixtral() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral")
}

fn config(experts: &str, budget: Option<usize>) -> Config {
    Config {
        model: mixtral(),
        experts: Some(experts.parse().unwrap()),
        coordinators: Vec::new(),
        advertise: None,
        memory_budget: budget,
        threads: Some(1),
        device: switchyard_kernels::Device::Cpu,
        limits: Default::default(),
        tls: switchyard_proto::tls::TlsFlags::plaintext(),
        probes: Default::default(),
        faults: Default::default(),
    }
}

/// A node holding `experts` of the Mixtral fixture, served on 127.0.0.1:0 until the returned
/// sender is dropped.
async fn start(experts: &str) -> Result<(ExpertServiceClient<Channel>, oneshot::Sender<()>)> {
    let node = ExpertNode::load(config(experts, None), &mut |_, _| {})?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(node.serve(listener, async move {
        let _ = stopped.await;
    }));
    let client = ExpertServiceClient::connect(format!("http://{addr}")).await?.max_decoding_message_size(64 << 20);
    Ok((client, stop))
}

/// A dispatch stream: send requests, read answers in order.
struct Stream {
    tx: mpsc::Sender<DispatchRequest>,
    rx: tonic::Streaming<DispatchResponse>,
}

impl Stream {
    async fn open(client: &mut ExpertServiceClient<Channel>) -> Result<Self> {
        let (tx, rx) = mpsc::channel(8);
        let rx = client.dispatch(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Stream { tx, rx })
    }

    async fn call(&mut self, req: DispatchRequest) -> Result<Result<Vec<f32>, (Code, String)>, tonic::Status> {
        let id = req.id;
        self.tx.send(req).await.expect("stream open");
        let resp = self.rx.message().await?.expect("an answer");
        assert_eq!(resp.id, id);
        Ok(match resp.result.expect("a result") {
            dispatch_response::Result::Partial(t) => Ok(tensor::to_f32(Some(&t), "partial", 64).unwrap().0),
            dispatch_response::Result::Error(e) => Err((Code::from(e.code), e.message)),
        })
    }
}

fn activations(rows: usize) -> Vec<f32> {
    (0..rows * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect()
}

fn request(id: u64, layer: u32, rows: usize, routes: &[(u32, u32, f32)]) -> DispatchRequest {
    DispatchRequest {
        id,
        epoch: 1,
        layer,
        activations: Some(tensor::from_f32(&activations(rows), 64)),
        tokens: routes.iter().map(|r| r.0).collect(),
        experts: routes.iter().map(|r| r.1).collect(),
        weights: routes.iter().map(|r| r.2).collect(),
        trace_context: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_sums_equal_the_in_process_experts_and_bad_dispatches_are_rejected() -> Result<()> {
    let (mut client, _stop) = start("0-3").await?;
    let health = client.health(HealthRequest {}).await?.into_inner();
    assert_eq!(health.state(), ServingState::Serving);
    let status = client.status(StatusRequest {}).await?.into_inner();
    assert_eq!(status.experts.len(), 2 * 4, "layers x experts 0-3");
    let mut stream = Stream::open(&mut client).await?;

    // A good dispatch: three rows, row 1 through two experts, row 2 through none.
    let routes = [(0, 1, 0.75), (1, 3, 0.5), (1, 0, 0.25), (2, 2, 0.0)];
    let got = stream.call(request(1, 1, 3, &routes)).await?.expect("a partial sum");
    let model = tokio::task::spawn_blocking(|| Model::load(&mixtral())).await??;
    let assignments: Vec<Assignment> =
        routes.iter().map(|&(token, expert, weight)| Assignment { token, expert, weight }).collect();
    let x = switchyard_kernels::Tensor::host(3, 64, activations(3))?;
    let want = model.experts().run(&model.exec, 1, &x, &assignments)?.into_host().expect("host memory");
    assert_eq!(got, want, "partial sums must be the in-process experts' bit for bit");

    // Each bad dispatch is refused with a status naming the problem; the stream stays open.
    let cases: Vec<(DispatchRequest, Code, &str)> = vec![
        (request(2, 9, 1, &[(0, 0, 1.0)]), Code::InvalidArgument, "layer 9 does not exist"),
        (request(3, 0, 1, &[(0, 5, 1.0)]), Code::NotFound, "does not hold layer 0 expert 5"),
        (request(4, 0, 1, &[(0, 8, 1.0)]), Code::InvalidArgument, "expert 8 does not exist"),
        (request(5, 0, 1, &[(3, 0, 1.0)]), Code::InvalidArgument, "token row 3"),
        (request(6, 0, 1, &[(0, 0, f32::NAN)]), Code::InvalidArgument, "not finite"),
        (
            DispatchRequest { weights: vec![], ..request(7, 0, 1, &[(0, 0, 1.0)]) },
            Code::InvalidArgument,
            "equally long",
        ),
        (
            DispatchRequest { activations: Some(tensor::from_f32(&[0.0; 65], 65)), ..request(8, 0, 1, &[(0, 0, 1.0)]) },
            Code::InvalidArgument,
            "activations: shape [1, 65], expected [tokens, 64]",
        ),
        (
            DispatchRequest {
                activations: Some(switchyard_proto::v1::Tensor {
                    dtype: Dtype::Bf16 as i32,
                    ..tensor::from_f32(&[0.0; 64], 64)
                }),
                ..request(9, 0, 1, &[(0, 0, 1.0)])
            },
            Code::InvalidArgument,
            "dtype DTYPE_BF16",
        ),
        (
            DispatchRequest { activations: None, ..request(10, 0, 1, &[]) },
            Code::InvalidArgument,
            "activations: missing",
        ),
    ];
    for (req, code, needle) in cases {
        let id = req.id;
        let (got_code, message) = stream.call(req).await?.expect_err("must be refused");
        assert_eq!(got_code, code, "dispatch {id}: {message}");
        assert!(message.contains(needle), "dispatch {id}: `{message}` should say `{needle}`");
    }
    // Still serving on the same stream.
    assert_eq!(stream.call(request(11, 1, 3, &routes)).await?.expect("a partial sum"), want);

    // A frame over the size limit ends that stream with OUT_OF_RANGE; the node keeps serving.
    let huge = request(12, 0, 20_000, &[(0, 0, 1.0)]);
    stream.tx.send(huge).await?;
    let err = stream.rx.message().await.expect_err("an oversized frame ends the stream");
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    let mut again = Stream::open(&mut client).await?;
    assert_eq!(again.call(request(13, 1, 3, &routes)).await?.expect("a partial sum"), want);
    Ok(())
}

#[test]
fn placements_over_the_memory_budget_or_outside_the_model_are_refused() {
    let whole = ExpertNode::load(config("all", None), &mut |_, _| {}).unwrap().held().bytes;
    match ExpertNode::load(config("all", Some(whole - 1)), &mut |_, _| {}) {
        Err(e @ NodeError::OverBudget { .. }) => {
            assert!(e.to_string().contains(&format!("needs {whole} bytes")), "{e}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a placement over budget must be refused"),
    }
    // Half the experts fit in half the budget.
    let half = ExpertNode::load(config("0-3", Some(whole / 2)), &mut |_, _| {}).unwrap();
    assert_eq!(half.held().bytes, whole / 2);
    let err = ExpertNode::load(config("0-8", None), &mut |_, _| {}).err().unwrap().to_string();
    assert!(err.contains("expert 8 is out of range"), "{err}");
}
