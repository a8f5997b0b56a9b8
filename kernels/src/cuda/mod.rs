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
//! with [`crate::cpu::matmul::BF16_PRODUCT_MIN_ROWS`] rows or more go to cuBLAS: bf16 weights against
//! bf16-rounded activations when [`crate::cpu::Precision::Bf16Products`] allows, `f32` GEMM for `f32`
//! weights, and the `f32` kernel otherwise (the reference numerics).
//!
//! # Layout
//! - [`source`]: the kernel sources and their NVRTC compilation.
//! - this module: [`Gpu`] (context, stream, cuBLAS, kernels), memory, and the one launch helper.
//! - `matmul`, `layers`, `moe`, `attention`: the operations, one file per `.cu` source.

mod attention;
mod layers;
mod matmul;
mod moe;
pub mod source;

pub use attention::{CacheShape, TokenTables};
pub use cudarc::driver::CudaSlice;
pub use matmul::{GroupedWeights, Projection, TILE_ROWS, tiles};
pub use moe::MAX_GATE_EXPERTS;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use half::slice::HalfFloatSliceExt;

use crate::{DType, KernelError, Weights};

/// Positions per KV-cache block (the CPU cache's block size; `attention.cu` agrees).
pub const BLOCK_TOKENS: usize = 16;

type Result<T> = std::result::Result<T, KernelError>;

fn cuda_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("{what}: {e}"))
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

    // ---- launches ----

    /// Launches kernel `name` over `cfg` with `args`, in the kernel's parameter order.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type, and every buffer it
    /// addresses must hold what the kernel reads and writes for `cfg`.
    unsafe fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let mut b = self.stream.launch_builder(self.function(name));
        for a in args {
            match a {
                Arg::Ptr(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::Shape(v) => b.arg(v),
            };
        }
        // SAFETY: the caller's contract.
        unsafe { b.launch(cfg) }.map_err(cuda_err(name))?;
        Ok(())
    }

    /// A buffer's address as a kernel argument.
    fn p<T>(&self, s: &CudaSlice<T>) -> Arg {
        Arg::Ptr(ptr(s, &self.stream))
    }
}

/// One kernel argument, by value (pointers as device addresses).
enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    Shape(CacheShape),
}

/// `n` elements, 256 threads a block, grid-stride beyond 65535 blocks.
fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// One block of `threads` per row.
fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}
