//! The CUDA backend (feature `cuda`): device memory, cuBLAS products and the kernels in
//! `kernels/cuda/*.cu`, compiled with NVRTC for the device at start-up.
//!
//! CUDA is loaded at run time (cudarc's dynamic loading): a build with this feature runs on a
//! machine without CUDA, and [`Gpu::open`] reports what is missing instead of failing at
//! start. Everything runs on one stream per [`Gpu`], so work is ordered without events.
//!
//! Activations are `f32` on the device; weights keep their checkpoint dtype ([`GpuMatrix`])
//! and are widened in registers, as on the CPU. Products with few rows (decode) run the
//! warp-per-column kernel of `matmul.cu`, which reads each weight once per step; products
//! with [`BF16_PRODUCT_MIN_ROWS`] rows or more go to cuBLAS: bf16 weights against
//! bf16-rounded activations when [`Precision::Bf16Products`] allows, `f32` GEMM for `f32`
//! weights, and the `f32` kernel otherwise (the reference numerics).
//!
//! # Layout
//! - [`source`]: the kernel sources and their NVRTC compilation.
//! - this module: [`Gpu`] (context, stream, cuBLAS, kernels) and its operations.

pub mod source;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use half::slice::HalfFloatSliceExt;

use crate::cpu::Precision;
use crate::cpu::matmul::BF16_PRODUCT_MIN_ROWS;
use crate::{DType, KernelError, Weights};

/// Positions per KV-cache block (the CPU cache's block size; `attention.cu` agrees).
pub const BLOCK_TOKENS: usize = 16;
/// Rows one grouped-product tile covers (`TILE_ROWS` in `matmul.cu`).
pub const TILE_ROWS: usize = 8;
/// Output columns per block of the product kernels (`COLS_PER_BLOCK`).
const COLS_PER_BLOCK: u32 = 8;
/// Experts a gate may choose from (`MAX_EXPERTS` in `moe.cu`).
pub const MAX_GATE_EXPERTS: usize = 256;

type Result<T> = std::result::Result<T, KernelError>;

fn cuda_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("{what}: {e}"))
}

fn blas_err(what: &str) -> impl FnOnce(cudarc::cublas::result::CublasError) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("{what}: {e:?}"))
}

/// Whether the CUDA libraries this backend loads are on this machine; `Err` names the
/// first one missing. cudarc panics on first use of a library it cannot load, so this runs
/// before anything touches CUDA.
pub fn probe_libraries() -> Result<()> {
    // SAFETY: the probes only try to open the shared libraries.
    let present = unsafe {
        [
            ("the CUDA driver (libcuda.so)", cudarc::driver::sys::is_culib_present()),
            ("cuBLAS (libcublas.so)", cudarc::cublas::sys::is_culib_present()),
            ("NVRTC (libnvrtc.so)", cudarc::nvrtc::sys::is_culib_present()),
        ]
    };
    match present.iter().find(|(_, ok)| !ok) {
        Some((name, _)) => Err(KernelError::NoCuda(format!("{name} was not found"))),
        None => Ok(()),
    }
}

/// Whether NVRTC can be loaded (all that compiling the kernels needs).
pub fn probe_nvrtc() -> Result<()> {
    // SAFETY: only tries to open the shared library.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::NoCuda("NVRTC (libnvrtc.so) was not found".into()))
    }
}

/// Number of CUDA devices, after checking the libraries are present.
pub fn device_count() -> Result<usize> {
    probe_libraries()?;
    let n = CudaContext::device_count().map_err(|e| KernelError::NoCuda(format!("the CUDA driver: {e}")))?;
    Ok(n.max(0) as usize)
}

/// A weight matrix `[rows, cols]` in device memory, in its checkpoint dtype.
pub struct GpuMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// `f32` elements, or the bits of `f16`/`bf16` ones.
    data: GpuData,
}

enum GpuData {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

impl GpuMatrix {
    pub fn size_in_bytes(&self) -> usize {
        self.rows * self.cols * self.dtype.size_in_bytes()
    }

    fn ptr(&self, stream: &CudaStream) -> u64 {
        match &self.data {
            GpuData::F32(s) => ptr(s, stream),
            GpuData::Half(s) => ptr(s, stream),
        }
    }
}

/// The device address of a buffer (one stream, no event tracking: see [`Gpu::open`]).
fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// The per-expert matrices of one projection of a MoE layer, addressed by slot, for the
/// grouped product: a device table of matrix addresses (and of bias addresses, 0 for none).
pub struct GroupedWeights {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    weights: CudaSlice<u64>,
    biases: CudaSlice<u64>,
}

/// One expert's matrix and optional bias, as [`Gpu::group`] takes them.
pub type Projection<'a> = (&'a GpuMatrix, Option<&'a CudaSlice<f32>>);

/// The shape of the KV arena a kernel call addresses (`CacheShape` in `attention.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CacheShape {
    pub layer: i32,
    pub n_layers: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
}

// SAFETY: `CacheShape` is `repr(C)` plain data, passed by value as in `attention.cu`.
unsafe impl DeviceRepr for CacheShape {}

/// Per new token: its position and where its sequence's block table starts.
pub struct TokenTables<'a> {
    pub pos: &'a CudaSlice<i32>,
    pub table_at: &'a CudaSlice<i32>,
    pub tables: &'a CudaSlice<i32>,
}

/// One CUDA device: its context and stream, a cuBLAS handle and the compiled kernels.
pub struct Gpu {
    ordinal: usize,
    name: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// A cuBLAS handle serves one host thread at a time.
    blas: Mutex<CudaBlas>,
    functions: HashMap<&'static str, CudaFunction>,
}

impl Gpu {
    /// Opens device `ordinal`: checks the libraries, creates the context, compiles the
    /// kernels for its architecture.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(KernelError::NoCuda(format!(
                "cuda:{ordinal} does not exist: this machine has {count} CUDA devices"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating the CUDA context"))?;
        // One stream orders every operation, so cudarc's cross-stream events are not needed.
        // SAFETY: no buffer of this context is used on another stream.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(cuda_err("reading the device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(cuda_err("reading the compute capability"))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| KernelError::Cuda(format!("creating cuBLAS: {e:?}")))?;
        let mut functions = HashMap::new();
        for src in source::SOURCES {
            let ptx = source::compile(src, major as u32, minor as u32)?;
            let module = ctx.load_module(ptx).map_err(cuda_err(src.name))?;
            for &f in src.functions {
                let func = module.load_function(f).map_err(cuda_err(f))?;
                functions.insert(f, func);
            }
        }
        tracing::info!(device = %format!("cuda:{ordinal}"), %name, sm = %format!("{major}.{minor}"), "CUDA device ready");
        Ok(Arc::new(Gpu { ordinal, name, ctx, stream, blas: Mutex::new(blas), functions }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.bind()?;
        self.ctx.mem_get_info().map_err(cuda_err("reading device memory"))
    }

    /// Makes the context current on the calling thread (cuBLAS needs it).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(cuda_err("binding the CUDA context"))
    }

    /// Waits for every queued operation.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronising the stream"))
    }

    fn function(&self, name: &str) -> &CudaFunction {
        self.functions.get(name).unwrap_or_else(|| panic!("kernel `{name}` is not in any source's function list"))
    }

    // ---- memory ----

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(cuda_err("copying to the device"))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(n.max(1)).map_err(cuda_err("allocating device memory"))
    }

    /// An uninitialised buffer, for outputs a kernel writes whole.
    pub fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: callers only read what a kernel has written.
        unsafe { self.stream.alloc(n.max(1)) }.map_err(cuda_err("allocating device memory"))
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let mut host = vec![T::default(); n];
        if n > 0 {
            self.stream.memcpy_dtoh(&dev.slice(..n), &mut host).map_err(cuda_err("copying from the device"))?;
            self.synchronize()?;
        }
        Ok(host)
    }

    /// Copies a weight matrix to the device in its dtype.
    pub fn upload_matrix(&self, w: Weights<'_>, rows: usize, cols: usize) -> Result<GpuMatrix> {
        assert_eq!(w.len(), rows * cols, "upload_matrix: {} values are not {rows}x{cols}", w.len());
        let data = match w {
            Weights::F32(v) => GpuData::F32(self.upload(v)?),
            Weights::F16(v) => GpuData::Half(self.upload(v.reinterpret_cast())?),
            Weights::BF16(v) => GpuData::Half(self.upload(v.reinterpret_cast())?),
        };
        Ok(GpuMatrix { dtype: w.dtype(), rows, cols, data })
    }

    /// The address table of one projection over a layer's expert slots (`None`: a slot with
    /// no expert, which no tile may name). Every matrix must share one dtype and shape.
    pub fn group(&self, slots: &[Option<Projection<'_>>]) -> Result<Option<GroupedWeights>> {
        let Some((first, _)) = slots.iter().flatten().next() else { return Ok(None) };
        let (dtype, rows, cols) = (first.dtype, first.rows, first.cols);
        let mut weights = Vec::with_capacity(slots.len());
        let mut biases = Vec::with_capacity(slots.len());
        for slot in slots {
            match slot {
                Some((m, b)) => {
                    if (m.dtype, m.rows, m.cols) != (dtype, rows, cols) {
                        return Err(KernelError::Cuda(format!(
                            "experts of one layer differ: {} {}x{} beside {} {rows}x{cols}",
                            m.dtype.name(),
                            m.rows,
                            m.cols,
                            dtype.name()
                        )));
                    }
                    weights.push(m.ptr(&self.stream));
                    biases.push(b.map_or(0, |b| ptr(b, &self.stream)));
                }
                None => {
                    weights.push(0);
                    biases.push(0);
                }
            }
        }
        Ok(Some(GroupedWeights { dtype, rows, cols, weights: self.upload(&weights)?, biases: self.upload(&biases)? }))
    }

    // ---- launches ----

    fn grid_1d(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }

    // ---- products ----

    /// `out[m, n] = x[m, k] · Wᵀ (+ bias)` for `w` `[n, k]`.
    pub fn linear(
        &self,
        x: &CudaSlice<f32>,
        w: &GpuMatrix,
        bias: Option<&CudaSlice<f32>>,
        m: usize,
        out: &mut CudaSlice<f32>,
        precision: Precision,
    ) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        if m == 0 || n == 0 {
            return Ok(());
        }
        debug_assert!(x.len() >= m * k && out.len() >= m * n);
        let s = &self.stream;
        let (xp, op) = (ptr(x, s), ptr(out, s));
        if m >= BF16_PRODUCT_MIN_ROWS && self.gemm(xp, w, w.ptr(s), op, m, precision)? {
            if let Some(b) = bias {
                self.add_bias(op, ptr(b, s), m, n)?;
            }
            return Ok(());
        }
        let f = self.function(match w.dtype {
            DType::BF16 => "linear_bf16",
            DType::F16 => "linear_f16",
            DType::F32 => "linear_f32",
        });
        let cfg = LaunchConfig {
            grid_dim: (m.div_ceil(TILE_ROWS) as u32, (n as u32).div_ceil(COLS_PER_BLOCK), 1),
            block_dim: (32 * COLS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (wp, bp) = (w.ptr(s), bias.map_or(0, |b| ptr(b, s)));
        let vec = i32::from(vectorizable(w.dtype, k));
        debug_assert!(vec == 0 || (wp % 16 == 0 && xp % 16 == 0), "16-byte packs need aligned rows");
        let (m, n, k) = (m as i32, n as i32, k as i32);
        let mut b = s.launch_builder(f);
        b.arg(&xp).arg(&wp).arg(&bp).arg(&op).arg(&m).arg(&n).arg(&k).arg(&vec);
        // SAFETY: the kernel reads m×k, n×k and n values and writes m×n, all within the buffers.
        unsafe { b.launch(cfg) }.map_err(cuda_err("linear"))?;
        Ok(())
    }

    /// `out = x · Wᵀ` through cuBLAS, when the dtype and precision allow; `false` otherwise.
    /// Column-major cuBLAS computes `outᵀ[n, m] = W[n, k] · xᵀ[k, m]`, the row-major `out`.
    fn gemm(&self, x: u64, w: &GpuMatrix, wp: u64, out: u64, m: usize, precision: Precision) -> Result<bool> {
        use blas_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
        let (n, k) = (w.rows, w.cols);
        let (a_type, xin, _rounded) = match (w.dtype, precision) {
            (DType::F32, _) => (CUDA_R_32F, x, None),
            (DType::BF16, Precision::Bf16Products) => {
                let rounded = self.alloc::<u16>(m * k)?;
                let rp = ptr(&rounded, &self.stream);
                self.round_to_bf16(x, rp, m * k)?;
                (CUDA_R_16BF, rp, Some(rounded))
            }
            _ => return Ok(false),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.bind()?;
        let blas_handle = self.blas.lock().expect("cuBLAS lock");
        // SAFETY: W is n×k, x is m×k (as a_type), out is m×n f32, all on this handle's stream.
        unsafe {
            blas::gemm_ex(
                *blas_handle.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                wp as *const _,
                a_type,
                k as i32,
                xin as *const _,
                a_type,
                k as i32,
                (&beta as *const f32).cast(),
                out as *mut _,
                CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err("cuBLAS GEMM"))?;
        Ok(true)
    }

    /// Every tile of `tiles` (expert slot, first row, rows; rows ≤ [`TILE_ROWS`]) through its
    /// expert's matrix: `out[r] = x[r] · W_eᵀ (+ b_e)` for the tile's rows.
    pub fn grouped_linear(
        &self,
        x: &CudaSlice<f32>,
        w: &GroupedWeights,
        tiles: &CudaSlice<i32>,
        n_tiles: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if n_tiles == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let f = self.function(match w.dtype {
            DType::BF16 => "grouped_linear_bf16",
            DType::F16 => "grouped_linear_f16",
            DType::F32 => "grouped_linear_f32",
        });
        let cfg = LaunchConfig {
            grid_dim: (n_tiles as u32, (w.rows as u32).div_ceil(COLS_PER_BLOCK), 1),
            block_dim: (32 * COLS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (xp, wp, bp, tp, op) = (ptr(x, s), ptr(&w.weights, s), ptr(&w.biases, s), ptr(tiles, s), ptr(out, s));
        let vec = i32::from(vectorizable(w.dtype, w.cols));
        let (n, k) = (w.rows as i32, w.cols as i32);
        let mut b = s.launch_builder(f);
        b.arg(&xp).arg(&wp).arg(&bp).arg(&tp).arg(&op).arg(&n).arg(&k).arg(&vec);
        // SAFETY: every tile names a slot with a matrix and rows within x and out.
        unsafe { b.launch(cfg) }.map_err(cuda_err("grouped_linear"))?;
        Ok(())
    }

    /// One expert's rows `row0 .. row0 + m` through cuBLAS (many rows routed to it).
    #[allow(clippy::too_many_arguments)]
    pub fn expert_gemm(
        &self,
        x: &CudaSlice<f32>,
        w: &GpuMatrix,
        bias: Option<&CudaSlice<f32>>,
        row0: usize,
        m: usize,
        out: &mut CudaSlice<f32>,
        precision: Precision,
    ) -> Result<bool> {
        let s = &self.stream;
        let xp = ptr(x, s) + (row0 * w.cols * 4) as u64;
        let op = ptr(out, s) + (row0 * w.rows * 4) as u64;
        if !self.gemm(xp, w, w.ptr(s), op, m, precision)? {
            return Ok(false);
        }
        if let Some(b) = bias {
            self.add_bias(op, ptr(b, s), m, w.rows)?;
        }
        Ok(true)
    }

    fn add_bias(&self, out: u64, bias: u64, m: usize, n: usize) -> Result<()> {
        let (mi, ni) = (m as i32, n as i32);
        let mut b = self.stream.launch_builder(self.function("add_bias"));
        b.arg(&out).arg(&bias).arg(&mi).arg(&ni);
        // SAFETY: out is m×n, bias n.
        unsafe { b.launch(Self::grid_1d(m * n)) }.map_err(cuda_err("add_bias"))?;
        Ok(())
    }

    fn round_to_bf16(&self, x: u64, out: u64, n: usize) -> Result<()> {
        let nl = n as i64;
        let mut b = self.stream.launch_builder(self.function("round_to_bf16"));
        b.arg(&x).arg(&out).arg(&nl);
        // SAFETY: x is n f32, out n u16.
        unsafe { b.launch(Self::grid_1d(n)) }.map_err(cuda_err("round_to_bf16"))?;
        Ok(())
    }

    // ---- rows ----

    /// `out[i] = table[ids[i]]`, rows of `h` widened to `f32`.
    pub fn embed(&self, table: &GpuMatrix, ids: &CudaSlice<u32>, n: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        let f = self.function(match table.dtype {
            DType::BF16 => "embed_bf16",
            DType::F16 => "embed_f16",
            DType::F32 => "embed_f32",
        });
        let s = &self.stream;
        let (tp, ip, op, h) = (table.ptr(s), ptr(ids, s), ptr(out, s), table.cols as i32);
        let mut b = s.launch_builder(f);
        b.arg(&tp).arg(&ip).arg(&op).arg(&h);
        // SAFETY: ids are checked against the vocabulary by the caller; out holds n rows.
        unsafe { b.launch(Self::rows_cfg(n, 256)) }.map_err(cuda_err("embed"))?;
        Ok(())
    }

    /// RMSNorm of `x.len() / w.len()`… rows: `rows` rows of `w`'s width.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let s = &self.stream;
        let (xp, wp, op, d) = (ptr(x, s), ptr(w, s), ptr(out, s), w.len() as i32);
        let mut b = s.launch_builder(self.function("rms_norm"));
        b.arg(&xp).arg(&wp).arg(&op).arg(&d).arg(&eps);
        // SAFETY: x and out hold rows × d values.
        unsafe { b.launch(Self::rows_cfg(rows, 256)) }.map_err(cuda_err("rms_norm"))?;
        Ok(())
    }

    /// RMSNorm in place.
    pub fn rms_norm_inplace(&self, x: &mut CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, eps: f32) -> Result<()> {
        let s = &self.stream;
        let (xp, wp, d) = (ptr(x, s), ptr(w, s), w.len() as i32);
        let mut b = s.launch_builder(self.function("rms_norm"));
        b.arg(&xp).arg(&wp).arg(&xp).arg(&d).arg(&eps);
        // SAFETY: each block reads its row whole before writing it.
        unsafe { b.launch(Self::rows_cfg(rows, 256)) }.map_err(cuda_err("rms_norm"))?;
        Ok(())
    }

    /// Rotary embedding of `heads` heads per token, from per-token cos/sin tables.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let s = &self.stream;
        let (xp, cp, sp, h, hd) = (ptr(x, s), ptr(cos, s), ptr(sin, s), heads as i32, head_dim as i32);
        let mut b = s.launch_builder(self.function("rope"));
        b.arg(&xp).arg(&cp).arg(&sp).arg(&h).arg(&hd);
        // SAFETY: x is tokens × heads × head_dim, the tables tokens × head_dim / 2.
        unsafe { b.launch(Self::rows_cfg(tokens, 128)) }.map_err(cuda_err("rope"))?;
        Ok(())
    }

    /// Clamps the first `n` values to `[-c, c]`.
    pub fn clip(&self, x: &mut CudaSlice<f32>, n: usize, c: f32) -> Result<()> {
        let (xp, nl) = (ptr(x, &self.stream), n as i64);
        let mut b = self.stream.launch_builder(self.function("clip"));
        b.arg(&xp).arg(&nl).arg(&c);
        // SAFETY: x holds n values.
        unsafe { b.launch(Self::grid_1d(n)) }.map_err(cuda_err("clip"))?;
        Ok(())
    }

    /// `x[..n] += y[..n]`.
    pub fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        let s = &self.stream;
        let (xp, yp, nl) = (ptr(x, s), ptr(y, s), n as i64);
        let mut b = s.launch_builder(self.function("add"));
        b.arg(&xp).arg(&yp).arg(&nl);
        // SAFETY: both hold n values.
        unsafe { b.launch(Self::grid_1d(n)) }.map_err(cuda_err("add"))?;
        Ok(())
    }

    /// `out = silu(gate) * up` over `n` values.
    pub fn swiglu(&self, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, out: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        let s = &self.stream;
        let (gp, up_, op, nl) = (ptr(gate, s), ptr(up, s), ptr(out, s), n as i64);
        let mut b = s.launch_builder(self.function("swiglu"));
        b.arg(&gp).arg(&up_).arg(&op).arg(&nl);
        // SAFETY: all hold n values.
        unsafe { b.launch(Self::grid_1d(n)) }.map_err(cuda_err("swiglu"))?;
        Ok(())
    }

    /// gpt-oss's clamped SwiGLU: `n` outputs from `2n` interleaved gate/up values.
    pub fn clamped_swiglu(
        &self,
        gate_up: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        alpha: f32,
        limit: f32,
    ) -> Result<()> {
        let s = &self.stream;
        let (gp, op, nl) = (ptr(gate_up, s), ptr(out, s), n as i64);
        let mut b = s.launch_builder(self.function("clamped_swiglu"));
        b.arg(&gp).arg(&op).arg(&nl).arg(&alpha).arg(&limit);
        // SAFETY: gate_up holds 2n values, out n.
        unsafe { b.launch(Self::grid_1d(n)) }.map_err(cuda_err("clamped_swiglu"))?;
        Ok(())
    }

    /// `y[r, :] *= σ(g[r])` over `rows` rows of `h`.
    pub fn scale_rows_sigmoid(&self, y: &mut CudaSlice<f32>, g: &CudaSlice<f32>, h: usize, rows: usize) -> Result<()> {
        let s = &self.stream;
        let (yp, gp, hi, rl) = (ptr(y, s), ptr(g, s), h as i32, rows as i64);
        let mut b = s.launch_builder(self.function("scale_rows_sigmoid"));
        b.arg(&yp).arg(&gp).arg(&hi).arg(&rl);
        // SAFETY: y holds rows × h values, g rows.
        unsafe { b.launch(Self::grid_1d(rows * h)) }.map_err(cuda_err("scale_rows_sigmoid"))?;
        Ok(())
    }

    /// `out[r] = x[idx[r]]` for `rows` rows of `h`.
    pub fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        idx: &CudaSlice<i32>,
        rows: usize,
        h: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let (xp, ip, op, hi) = (ptr(x, s), ptr(idx, s), ptr(out, s), h as i32);
        let mut b = s.launch_builder(self.function("gather_rows"));
        b.arg(&xp).arg(&ip).arg(&op).arg(&hi);
        // SAFETY: every index is a row of x; out holds rows × h.
        unsafe { b.launch(Self::rows_cfg(rows, 256)) }.map_err(cuda_err("gather_rows"))?;
        Ok(())
    }

    // ---- MoE ----

    /// The top-`k` experts of each of `tokens` rows of `e` gate logits, best first, and their
    /// weights (`softmax_first`: softmax over all experts then top-k, renormalised if asked;
    /// otherwise top-k then softmax over the k).
    #[allow(clippy::too_many_arguments)]
    pub fn topk_gate(
        &self,
        logits: &CudaSlice<f32>,
        tokens: usize,
        e: usize,
        k: usize,
        softmax_first: bool,
        renormalize: bool,
        ids: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if e > MAX_GATE_EXPERTS || k > 32 || k > e {
            return Err(KernelError::Cuda(format!(
                "the GPU gate takes up to {MAX_GATE_EXPERTS} experts and top-32; this model routes {k} of {e}"
            )));
        }
        let s = &self.stream;
        let (lp, ip, wp) = (ptr(logits, s), ptr(ids, s), ptr(weights, s));
        let (t, ei, ki, mode, renorm) =
            (tokens as i32, e as i32, k as i32, i32::from(!softmax_first), i32::from(renormalize));
        let warps = 8u32;
        let cfg = LaunchConfig {
            grid_dim: ((tokens as u32).div_ceil(warps).max(1), 1, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(self.function("topk_gate"));
        b.arg(&lp).arg(&ip).arg(&wp).arg(&t).arg(&ei).arg(&ki).arg(&mode).arg(&renorm);
        // SAFETY: logits hold tokens × e values, ids and weights tokens × k.
        unsafe { b.launch(cfg) }.map_err(cuda_err("topk_gate"))?;
        Ok(())
    }

    /// `out[t] = Σ_j w[j] · y[src[j]]` over token `t`'s entries `start[t] .. start[t + 1]`.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_rows(
        &self,
        y: &CudaSlice<f32>,
        start: &CudaSlice<i32>,
        src: &CudaSlice<i32>,
        w: &CudaSlice<f32>,
        tokens: usize,
        h: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let s = &self.stream;
        let (yp, sp, srp, wp, op, hi) = (ptr(y, s), ptr(start, s), ptr(src, s), ptr(w, s), ptr(out, s), h as i32);
        let mut b = s.launch_builder(self.function("combine_rows"));
        b.arg(&yp).arg(&sp).arg(&srp).arg(&wp).arg(&op).arg(&hi);
        // SAFETY: start has tokens + 1 offsets into src/w, whose rows are rows of y.
        unsafe { b.launch(Self::rows_cfg(tokens, 256)) }.map_err(cuda_err("combine_rows"))?;
        Ok(())
    }

    // ---- attention ----

    /// Writes `tokens` new tokens' keys and values (`[token, kv_head, head_dim]`) of one layer
    /// into the KV arena.
    pub fn kv_write(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        arena: &mut CudaSlice<f32>,
        tokens: usize,
        at: &TokenTables<'_>,
        shape: CacheShape,
    ) -> Result<()> {
        let s = &self.stream;
        let (kp, vp, ap) = (ptr(k, s), ptr(v, s), ptr(arena, s));
        let (pp, tap, tp) = (ptr(at.pos, s), ptr(at.table_at, s), ptr(at.tables, s));
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, shape.n_kv_heads as u32, 1),
            block_dim: (shape.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(self.function("kv_write"));
        b.arg(&kp).arg(&vp).arg(&ap).arg(&pp).arg(&tap).arg(&tp).arg(&shape);
        // SAFETY: every token's position lies in a block its table lists, inside the arena.
        unsafe { b.launch(cfg) }.map_err(cuda_err("kv_write"))?;
        Ok(())
    }

    /// Causal attention of `tokens` new tokens over their sequences' cached positions.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        q: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        arena: &CudaSlice<f32>,
        tokens: usize,
        at: &TokenTables<'_>,
        sinks: Option<&CudaSlice<f32>>,
        shape: CacheShape,
        n_heads: usize,
        sliding_window: Option<usize>,
    ) -> Result<()> {
        if shape.head_dim as usize > 256 {
            return Err(KernelError::Cuda(format!("head_dim {} exceeds the GPU attention's 256", shape.head_dim)));
        }
        let s = &self.stream;
        let (qp, op, ap) = (ptr(q, s), ptr(out, s), ptr(arena, s));
        let (pp, tap, tp, sp) =
            (ptr(at.pos, s), ptr(at.table_at, s), ptr(at.tables, s), sinks.map_or(0, |x| ptr(x, s)));
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let (nh, window) = (n_heads as i32, sliding_window.map_or(0, |w| w as i32));
        let cfg =
            LaunchConfig { grid_dim: (tokens as u32, n_heads as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let mut b = s.launch_builder(self.function("paged_attention"));
        b.arg(&qp).arg(&op).arg(&ap).arg(&pp).arg(&tap).arg(&tp).arg(&sp).arg(&shape).arg(&nh).arg(&scale).arg(&window);
        // SAFETY: as kv_write; q and out hold tokens × n_heads × head_dim.
        unsafe { b.launch(cfg) }.map_err(cuda_err("paged_attention"))?;
        Ok(())
    }

    /// Measured read bandwidth of device memory in bytes/s: the best of `reps` passes over a
    /// buffer of `bytes` (much larger than the L2 cache).
    pub fn read_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let n4 = bytes / 16;
        let buf = self.zeros::<f32>(n4 * 4)?;
        let blocks = 4 * 132 * 8;
        let partial = self.zeros::<f32>(blocks)?;
        let s = &self.stream;
        let (xp, pp, nl) = (ptr(&buf, s), ptr(&partial, s), n4 as i64);
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) + 1 {
            self.synchronize()?;
            let start = std::time::Instant::now();
            let mut b = s.launch_builder(self.function("read_sum"));
            b.arg(&xp).arg(&nl).arg(&pp);
            // SAFETY: buf holds n4 float4s, partial one float per block.
            unsafe { b.launch(cfg) }.map_err(cuda_err("read_sum"))?;
            self.synchronize()?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok((n4 * 16) as f64 / best)
    }

    // ---- sampling ----

    /// Per row of `v` logits: the greedy token (ties to the lower id) and its
    /// log-probability.
    pub fn greedy_pick(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        v: usize,
        ids: &mut CudaSlice<i32>,
        logprobs: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let s = &self.stream;
        let (lp, ip, pp, vi) = (ptr(logits, s), ptr(ids, s), ptr(logprobs, s), v as i32);
        let mut b = s.launch_builder(self.function("greedy_pick"));
        b.arg(&lp).arg(&vi).arg(&ip).arg(&pp);
        // SAFETY: logits hold rows × v values, ids and logprobs rows.
        unsafe { b.launch(Self::rows_cfg(rows, 1024)) }.map_err(cuda_err("greedy_pick"))?;
        Ok(())
    }
}

/// Whether the product kernels may read a row of `k` weights in 16-byte packs (device
/// allocations are 256-byte aligned, so rows are when `k` fills whole packs).
fn vectorizable(dtype: DType, k: usize) -> bool {
    k.is_multiple_of(16 / dtype.size_in_bytes())
}

/// Splits rows grouped by expert (`counts[e]` rows of slot `e`, in slot order) into tiles of
/// at most [`TILE_ROWS`] rows for [`Gpu::grouped_linear`], as (slot, first row, rows)
/// triples; experts with `skip(e)` are left out (they run through cuBLAS).
pub fn tiles(counts: &[usize], skip: impl Fn(usize) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    let mut row = 0;
    for (e, &c) in counts.iter().enumerate() {
        if !skip(e) {
            for start in (0..c).step_by(TILE_ROWS) {
                out.extend([e as i32, (row + start) as i32, (c - start).min(TILE_ROWS) as i32]);
            }
        }
        row += c;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_each_experts_rows() {
        let t = tiles(&[3, 0, 17, 2], |e| e == 3);
        assert_eq!(t, vec![0, 0, 3, 2, 3, 8, 2, 11, 8, 2, 19, 1]);
    }

    #[test]
    fn packs_need_whole_rows() {
        assert!(vectorizable(DType::BF16, 2880));
        assert!(!vectorizable(DType::BF16, 36));
        assert!(vectorizable(DType::F32, 36));
    }
}
