//! [`CudaBackend`]: the forward pass's operations on one CUDA device, over the kernels of
//! [`crate::cuda`].
//!
//! Every operation first runs the argument checks [`super::CpuBackend`] runs (the shared
//! [`check`] functions, in the same order), so both backends refuse the same calls with the
//! same errors; then it hands its tensors' device buffers to the device layer, which checks
//! once more that each buffer holds what its kernel touches. Index arguments are checked on
//! the host before they are uploaded.
//!
//! Results agree with the CPU's to rounding (sums run in another order on the device), and
//! exactly where the CPU defines the order: [`Backend::combine_rows`] adds each token's
//! entries in order from 0 without fused multiply-adds; ids of [`Backend::greedy`] and
//! [`Backend::top_k_gate`] break ties to the lower id.

use std::sync::Arc;

use super::{Attention, Backend, Combine, Gate, Grouped, KvBatch, KvLayout, Mla, SeqSpan, TopK, check};
use crate::cpu::Precision;
use crate::cuda::{AttentionArgs, CudaSlice, DeviceTables, Gpu, GpuMatrix, Projection};
use crate::error::{KernelError, Result};
use crate::tensor::{Data, Shape};
use crate::weight::{BiasData, WeightData};
use crate::{Device, Tensor, Weight};

/// One CUDA device. Tensors and weights it makes live in that device's memory; operations
/// queue on the device's one stream, and only the calls that return host values
/// ([`Backend::download`], [`Backend::top_k_gate`], [`Backend::non_finite_rows`],
/// [`Backend::greedy`]) wait for it.
#[derive(Clone, Debug)]
pub struct CudaBackend {
    gpu: Arc<Gpu>,
}

impl CudaBackend {
    /// Opens device `ordinal` (see [`Gpu::open`]: it compiles the kernels for the device).
    pub fn open(ordinal: usize) -> Result<Self> {
        Ok(CudaBackend { gpu: Gpu::open(ordinal)? })
    }

    /// The device layer, for tools that report on the device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn ordinal(&self) -> usize {
        self.gpu.ordinal()
    }

    /// A `[rows, cols]` tensor of `s`, which holds at least `rows × cols` values.
    fn tensor(&self, rows: usize, cols: usize, s: CudaSlice<f32>) -> Tensor {
        debug_assert!(s.len() >= rows * cols);
        Tensor::from_data(rows, cols, Data::CudaF32(s, self.ordinal()))
    }

    /// The device buffer of `t`, which must be on this device.
    fn buf<'t>(&self, op: &'static str, arg: &'static str, t: &'t Tensor) -> Result<&'t CudaSlice<f32>> {
        t.cuda_f32(op, arg, self.ordinal())
    }

    fn buf_mut<'t>(&self, op: &'static str, arg: &'static str, t: &'t mut Tensor) -> Result<&'t mut CudaSlice<f32>> {
        t.cuda_f32_mut(op, arg, self.ordinal())
    }

    /// The matrix and bias of `w`, which must be on this device.
    fn weight<'w>(
        &self,
        op: &'static str,
        arg: &'static str,
        w: &'w Weight,
    ) -> Result<(&'w GpuMatrix, Option<&'w CudaSlice<f32>>)> {
        let (m, b) = w.cuda_parts(op, arg, self.ordinal())?;
        Ok((m, b.map(|b| &**b)))
    }

    /// The device tables of a batch, which this device's [`Backend::kv_batch`] made.
    fn tables<'b>(&self, op: &'static str, batch: &'b KvBatch) -> Result<&'b DeviceTables> {
        batch.tables.as_ref().ok_or(KernelError::WrongDevice {
            op,
            arg: "batch",
            expected: self.device(),
            got: Device::Cpu,
        })
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal())
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.device(), self.gpu.name())
    }

    fn upload(&self, values: &[f32], rows: usize, cols: usize) -> Result<Tensor> {
        let op = "upload";
        if rows.checked_mul(cols) != Some(values.len()) {
            return Err(KernelError::shape(op, "values", Shape(rows, cols), format!("{} values", values.len())));
        }
        Ok(self.tensor(rows, cols, self.gpu.upload(op, values)?))
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<Tensor> {
        let op = "zeros";
        let n = rows.checked_mul(cols).ok_or_else(|| KernelError::Unsupported {
            op,
            message: format!("a tensor of {} is too large", Shape(rows, cols)),
        })?;
        Ok(self.tensor(rows, cols, self.gpu.zeros(op, n)?))
    }

    fn download(&self, x: &Tensor) -> Result<Vec<f32>> {
        self.gpu.download("download", self.buf("download", "x", x)?, x.len())
    }

    fn upload_weight(&self, w: &Weight) -> Result<Weight> {
        let op = "upload_weight";
        match &w.data {
            WeightData::Host { .. } => {
                let (view, bias) = w.host_parts(op, "w")?;
                let matrix = self.gpu.upload_matrix(op, view, w.rows(), w.cols())?;
                let bias = match bias {
                    Some(b) => Some(BiasData::Cuda(Arc::new(self.gpu.upload(op, b)?), self.ordinal())),
                    None => None,
                };
                Ok(Weight::from_parts(w.format(), w.rows(), w.cols(), WeightData::Cuda(Arc::new(matrix)), bias))
            }
            // Already here: shared, as the CPU shares a host weight.
            WeightData::Cuda(m) if m.ordinal == self.ordinal() => Ok(w.clone()),
            WeightData::Cuda(_) => {
                Err(KernelError::WrongDevice { op, arg: "w", expected: self.device(), got: w.device() })
            }
        }
    }

    fn memory(&self) -> Result<Option<(usize, usize)>> {
        Ok(Some(self.gpu.memory()?))
    }

    fn read_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64> {
        self.gpu.read_bandwidth(bytes, repeats)
    }

    fn embed(&self, table: &Weight, ids: &[u32]) -> Result<Tensor> {
        check::embed(table, ids)?;
        let (m, _) = self.weight("embed", "table", table)?;
        Ok(self.tensor(ids.len(), table.cols(), self.gpu.embed(m, ids)?))
    }

    fn linear(&self, x: &Tensor, w: &Weight, precision: Precision) -> Result<Tensor> {
        let op = "linear";
        check::linear(op, x, w)?;
        let (m, bias) = self.weight(op, "weight", w)?;
        let y = self.gpu.linear(self.buf(op, "x", x)?, x.rows(), m, bias, precision)?;
        Ok(self.tensor(x.rows(), w.rows(), y))
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        let op = "rms_norm";
        check::norm(op, x, weight)?;
        let (xs, ws) = (self.buf(op, "x", x)?, self.buf(op, "weight", weight)?);
        Ok(self.tensor(x.rows(), x.cols(), self.gpu.rms_norm(xs, x.len(), ws, weight.len(), eps)?))
    }

    fn rms_norm_inplace(&self, x: &mut Tensor, weight: &Tensor, eps: f32) -> Result<()> {
        let op = "rms_norm";
        check::norm(op, x, weight)?;
        let (len, ws) = (x.len(), self.buf(op, "weight", weight)?);
        self.gpu.rms_norm_inplace(self.buf_mut(op, "x", x)?, len, ws, weight.len(), eps)
    }

    fn rope(&self, x: &mut Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<()> {
        let op = "rope";
        let head_dim = check::rope(x, cos, sin, heads)?;
        let (c, s) = (self.buf(op, "cos", cos)?, self.buf(op, "sin", sin)?);
        let dims = [x.rows(), heads, head_dim];
        self.gpu.rope(self.buf_mut(op, "x", x)?, dims, c, s)
    }

    fn clip(&self, x: &mut Tensor, limit: f32) -> Result<()> {
        let op = "clip";
        check::clip(limit)?;
        let n = x.len();
        self.gpu.clip(self.buf_mut(op, "x", x)?, n, limit)
    }

    fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        let op = "add";
        check::same_shape(op, "y", x, y)?;
        let (n, ys) = (x.len(), self.buf(op, "y", y)?);
        self.gpu.add(self.buf_mut(op, "x", x)?, ys, n)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let op = "swiglu";
        check::same_shape(op, "up", gate, up)?;
        let y = self.gpu.swiglu(self.buf(op, "gate", gate)?, self.buf(op, "up", up)?, gate.len())?;
        Ok(self.tensor(gate.rows(), gate.cols(), y))
    }

    fn clamped_swiglu(&self, gate_up: &Tensor, alpha: f32, limit: f32) -> Result<Tensor> {
        let op = "clamped_swiglu";
        if !gate_up.cols().is_multiple_of(2) {
            return Err(KernelError::shape(op, "gate_up", "an even number of columns", gate_up.shape()));
        }
        let y = self.gpu.clamped_swiglu(self.buf(op, "gate_up", gate_up)?, gate_up.len() / 2, alpha, limit)?;
        Ok(self.tensor(gate_up.rows(), gate_up.cols() / 2, y))
    }

    fn scale_rows_sigmoid(&self, y: &mut Tensor, gate: &Tensor) -> Result<()> {
        let op = "scale_rows_sigmoid";
        gate.expect_len(op, "gate", y.rows())?;
        let (rows, h, g) = (y.rows(), y.cols(), self.buf(op, "gate", gate)?);
        self.gpu.scale_rows_sigmoid(self.buf_mut(op, "y", y)?, rows, h, g)
    }

    fn gather_rows(&self, x: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let op = "gather_rows";
        check::gather(x, rows)?;
        let y = self.gpu.gather_rows(self.buf(op, "x", x)?, [x.rows(), x.cols()], rows)?;
        Ok(self.tensor(rows.len(), x.cols(), y))
    }

    fn non_finite_rows(&self, x: &Tensor) -> Result<Vec<u32>> {
        self.gpu.non_finite_rows(self.buf("non_finite_rows", "x", x)?, x.rows(), x.cols())
    }

    fn top_k_gate(&self, logits: &Tensor, k: usize, gate: Gate) -> Result<TopK> {
        let op = "top_k_gate";
        check::top_k(logits, k)?;
        let dims = [logits.rows(), logits.cols()];
        let (ids, weights) = self.gpu.top_k_gate(self.buf(op, "logits", logits)?, dims, k, gate)?;
        Ok(TopK { k, ids, weights })
    }

    fn group(&self, slots: Vec<Option<Weight>>) -> Result<Grouped> {
        let op = "group";
        check::group(&slots, self.device())?;
        let mut projections: Vec<Option<Projection>> = Vec::with_capacity(slots.len());
        for w in &slots {
            projections.push(match w {
                Some(w) => {
                    let (m, b) = w.cuda_parts(op, "expert weight", self.ordinal())?;
                    Some((m.clone(), b.cloned()))
                }
                None => None,
            });
        }
        let table = self.gpu.group(projections)?;
        Ok(Grouped { slots, table })
    }

    fn grouped_linear(&self, x: &Tensor, w: &Grouped, counts: &[usize], precision: Precision) -> Result<Tensor> {
        let op = "grouped_linear";
        let n = check::grouped(x, w, counts)?;
        let xs = self.buf(op, "x", x)?;
        let y = match &w.table {
            Some(table) => self.gpu.grouped_linear(xs, table, counts, precision)?,
            // No slot holds an expert, so no row was routed (checked): nothing to compute.
            None if w.shape().is_none() => self.gpu.zeros(op, 0)?,
            // Held weights but no device table: a group made by another backend.
            None => {
                let got = w.slots.iter().flatten().next().map_or(Device::Cpu, Weight::device);
                return Err(KernelError::WrongDevice { op, arg: "w", expected: self.device(), got });
            }
        };
        Ok(self.tensor(x.rows(), n, y))
    }

    fn combine_rows(&self, y: &Tensor, combine: &Combine) -> Result<Tensor> {
        let op = "combine_rows";
        combine.check(op, y.rows())?;
        let out = self.gpu.combine_rows(self.buf(op, "y", y)?, [y.rows(), y.cols()], combine)?;
        Ok(self.tensor(combine.tokens(), y.cols(), out))
    }

    fn kv_arena(&self, layout: KvLayout, blocks: usize) -> Result<Tensor> {
        self.zeros(blocks, layout.block_floats())
    }

    fn kv_batch(&self, layout: KvLayout, arena: &Tensor, seqs: &[SeqSpan<'_>]) -> Result<KvBatch> {
        let mut batch = KvBatch::new(layout, arena, seqs)?;
        self.buf("kv_batch", "arena", arena)?;
        let spans: Vec<SeqSpan<'_>> = batch
            .seqs
            .iter()
            .map(|(_, tokens, first_pos, blocks)| SeqSpan { tokens: *tokens, first_pos: *first_pos, blocks })
            .collect();
        let tables = self.gpu.device_tables(layout, batch.arena_blocks, &spans)?;
        batch.tables = Some(tables);
        Ok(batch)
    }

    fn kv_write(&self, arena: &mut Tensor, batch: &KvBatch, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let op = "kv_write";
        check::kv_write(batch, layer, k, v)?;
        batch.check_arena(op, arena)?;
        let t = self.tables(op, batch)?;
        let (ks, vs) = (self.buf(op, "k", k)?, self.buf(op, "v", v)?);
        self.gpu.kv_write(self.buf_mut(op, "arena", arena)?, t, layer, ks, vs)
    }

    fn mla_write(&self, _: &mut Tensor, _: &KvBatch, _: usize, _: &Tensor, _: &Tensor) -> Result<()> {
        Err(KernelError::Unsupported { op: "mla_write", message: "MLA attention on CUDA (it runs on the CPU)".into() })
    }

    fn mla_attention(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &KvBatch, _: Mla<'_>) -> Result<Tensor> {
        Err(KernelError::Unsupported {
            op: "mla_attention",
            message: "MLA attention on CUDA (it runs on the CPU)".into(),
        })
    }

    fn attention(&self, q: &Tensor, arena: &Tensor, batch: &KvBatch, p: Attention<'_>) -> Result<Tensor> {
        let op = "attention";
        check::attention(q, batch, &p)?;
        batch.check_arena(op, arena)?;
        let t = self.tables(op, batch)?;
        let sinks = p.sinks.map(|s| self.buf(op, "sinks", s)).transpose()?;
        let args =
            AttentionArgs { layer: p.layer, heads: p.heads, scale: p.scale, sliding_window: p.sliding_window, sinks };
        let out = self.gpu.paged_attention(self.buf(op, "q", q)?, self.buf(op, "arena", arena)?, t, args)?;
        Ok(self.tensor(q.rows(), q.cols(), out))
    }

    fn greedy(&self, logits: &Tensor) -> Result<Vec<(u32, f32)>> {
        let logits_d = self.buf("greedy", "logits", logits)?;
        // Rows of no logits have no pick; the CPU returns none for them either.
        if logits.cols() == 0 {
            return Ok(Vec::new());
        }
        self.gpu.greedy(logits_d, logits.rows(), logits.cols())
    }
}
