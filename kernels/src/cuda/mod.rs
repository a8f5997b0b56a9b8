//! The device layer of [`crate::CudaBackend`] (feature `cuda`): device memory, cuBLAS products
//! and the kernels in `kernels/cuda/*.cu`, compiled with NVRTC for the device at start-up.
//!
//! CUDA is loaded at run time (cudarc's dynamic loading): a build with this feature runs on a
//! machine without CUDA, and [`Gpu::open`] reports what is missing instead of failing at
//! start. Everything runs on one stream per [`Gpu`], so work is ordered without events.
//!
//! Activations are `f32` on the device; weights keep their checkpoint format (`GpuMatrix`:
//! bf16, f16, `f32`, or MXFP4 and FP8 with their scales beside them) and are widened in
//! registers, as on the CPU; a quantized matrix is never decoded into a copy. Products with
//! few rows (decode) run the warp-per-column kernel of `matmul.cu`, which reads each weight
//! once per step; products with [`crate::cpu::matmul::BF16_PRODUCT_MIN_ROWS`] rows or more go
//! to cuBLAS: bf16 weights against bf16-rounded activations when
//! [`crate::cpu::Precision::Bf16Products`] allows, `f32` GEMM for `f32` weights, and the
//! kernel otherwise (the reference numerics; always for the quantized formats).
//!
//! # Memory safety
//! A kernel or cuBLAS reads and writes whatever addresses it is given, so the checks live
//! here, in front of the few `unsafe` helpers (the launch helper, the cuBLAS call, an
//! uninitialised allocation): every operation is a safe function that, before it launches,
//! checks that each buffer is on this device and holds what the kernel touches for the sizes
//! it was given (sizes multiplied with overflow checks), that every size fits the kernel's
//! `int` arguments and the launch limits, and that every index it uploads (token ids, rows,
//! block tables, expert slots) points inside what it indexes. It relies on nothing a caller
//! promises, not even a [`crate::Tensor`]'s shape. The `// SAFETY:` comment at each launch
//! says which checks cover it. Outputs are allocated by the operation that fills them whole,
//! so no uninitialised buffer leaves this module.
//!
//! The operations are `pub(crate)`: [`crate::CudaBackend`] is the public API, and adds the
//! argument checks every backend shares. Public here are only what tools and tests need to
//! find and probe a device.
//!
//! # Layout
//! - [`source`]: the kernel sources and their NVRTC compilation.
//! - this module: [`Gpu`] (context, stream, cuBLAS, kernels), memory, errors, the launch
//!   helper and its size checks.
//! - `matmul`, `layers`, `moe`, `attention`: the operations, one file per `.cu` source.

mod attention;
mod layers;
mod matmul;
mod moe;
pub mod source;

pub use attention::MAX_HEAD_DIM;
pub(crate) use attention::{AttentionArgs, DeviceTables};
pub use cudarc::driver::CudaSlice;
pub(crate) use matmul::{GroupedWeights, Projection};
pub use moe::{MAX_GATE_EXPERTS, MAX_GATE_K};

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::result::CublasError;
use cudarc::driver::sys::CUresult;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DevicePtr, DeviceRepr, DriverError, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use half::slice::HalfFloatSliceExt;

use crate::error::{KernelError, Result};
use crate::{Device, Format, Weights, quant};

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

// ---- errors ----

/// A driver error of `op` on device `ordinal`: out of memory (allocating `bytes`, 0 where the
/// operation allocates nothing itself) is [`KernelError::OutOfMemory`], which a caller may
/// retry elsewhere; anything else is a device fault, [`KernelError::Cuda`].
fn driver_error(op: &'static str, ordinal: usize, bytes: usize, e: DriverError) -> KernelError {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        KernelError::OutOfMemory { op, device: Device::Cuda(ordinal), bytes }
    } else {
        KernelError::Cuda { op, message: e.to_string() }
    }
}

/// A cuBLAS error of `op`. cuBLAS failing to allocate its workspace is running out of
/// memory, not a broken device.
fn blas_error(op: &'static str, ordinal: usize, e: CublasError) -> KernelError {
    use cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED;
    if e.0 == CUBLAS_STATUS_ALLOC_FAILED {
        KernelError::OutOfMemory { op, device: Device::Cuda(ordinal), bytes: 0 }
    } else {
        KernelError::Cuda { op, message: format!("cuBLAS: {e}") }
    }
}

// ---- sizes ----

/// The product of `dims`, or an error where it overflows (a size no buffer can have).
fn count(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| KernelError::Unsupported { op, message: format!("a tensor of {dims:?} elements is too large") })
}

/// `v` as a kernel's `int` argument.
fn int(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::Unsupported {
        op,
        message: format!("{what} of {v} exceeds the CUDA kernels' limit of {}", i32::MAX),
    })
}

/// A grid of `x × y` blocks of `threads`, checked against the launch limits (x up to
/// 2^31 - 1 blocks, y up to 65535), so a size beyond them is an error naming the operation
/// rather than a failed launch. Empty grids are the caller's to skip.
fn grid(op: &'static str, x: usize, y: usize, threads: u32) -> Result<LaunchConfig> {
    if x > i32::MAX as usize || y > 65_535 {
        return Err(KernelError::Unsupported {
            op,
            message: format!("a launch of {x} × {y} blocks exceeds the device's grid limits (2^31 - 1 × 65535)"),
        });
    }
    Ok(LaunchConfig { grid_dim: (x as u32, y as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// `n` elements, 256 threads a block, grid-stride beyond 65535 blocks (the kernels loop).
fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

// ---- weights ----

/// A weight matrix `[rows, cols]` in device memory, in its checkpoint format: its values and,
/// for a quantized format, its scales (E8M0 bytes for MXFP4, `f32` for FP8), which the
/// product kernels decode in registers. Its buffers hold at least the bytes [`matrix_bytes`]
/// gives (one element for an empty matrix); it is only made by [`Gpu::upload_matrix`], which
/// copies exactly those.
pub(crate) struct GpuMatrix {
    pub(crate) format: Format,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// The device holding the matrix.
    pub(crate) ordinal: usize,
    data: GpuData,
    /// The scales of a quantized format; `None` for a dense one.
    scales: Option<GpuData>,
}

/// `f32` elements, the bits of `f16`/`bf16` ones, or bytes (MXFP4 blocks and E8M0 scales,
/// FP8 values).
enum GpuData {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
    Bytes(CudaSlice<u8>),
}

impl GpuData {
    fn bytes(&self) -> usize {
        match self {
            GpuData::F32(s) => s.len() * 4,
            GpuData::Half(s) => s.len() * 2,
            GpuData::Bytes(s) => s.len(),
        }
    }

    fn ptr(&self, stream: &CudaStream) -> u64 {
        match self {
            GpuData::F32(s) => ptr(s, stream),
            GpuData::Half(s) => ptr(s, stream),
            GpuData::Bytes(s) => ptr(s, stream),
        }
    }
}

impl GpuMatrix {
    /// The address of the values.
    fn ptr(&self, stream: &CudaStream) -> u64 {
        self.data.ptr(stream)
    }

    /// The address of the scales; 0 for a dense format.
    fn scales_ptr(&self, stream: &CudaStream) -> u64 {
        self.scales.as_ref().map_or(0, |s| s.ptr(stream))
    }
}

/// Bytes of a `[rows, cols]` matrix of `format` as the kernels read it: `(values, scales)`,
/// scales 0 for a dense format. Checked, so the sizes cannot overflow, and refusing what the
/// kernels cannot address: an MXFP4 row of part of a block, an FP8 scale block of 0 or of
/// more than an `int`.
fn matrix_bytes(op: &'static str, format: Format, rows: usize, cols: usize) -> Result<(usize, usize)> {
    let n = count(op, &[rows, cols])?;
    match format {
        Format::Mxfp4 => {
            if !cols.is_multiple_of(quant::MXFP4_BLOCK) {
                return Err(KernelError::Unsupported {
                    op,
                    message: format!("an MXFP4 row of {cols} values is not a whole number of 32-value blocks"),
                });
            }
            Ok((n / 2, n / quant::MXFP4_BLOCK))
        }
        Format::Fp8 { block: [b0, b1] } => {
            if b0 == 0 || b1 == 0 {
                return Err(KernelError::Unsupported { op, message: format!("FP8 scale blocks of {b0}x{b1}") });
            }
            int(op, "an FP8 scale block's rows", b0)?;
            int(op, "an FP8 scale block's columns", b1)?;
            Ok((n, count(op, &[rows.div_ceil(b0), cols.div_ceil(b1), 4])?))
        }
        dense => {
            let size = dense.dtype().expect("a format without scales is dense").size_in_bytes();
            Ok((count(op, &[n, size])?, 0))
        }
    }
}

/// The device address of a buffer (one stream, no event tracking: see [`Gpu::open`]).
fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

// ---- the device ----

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

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpu(cuda:{} {})", self.ordinal, self.name)
    }
}

impl Gpu {
    /// Opens device `ordinal`: checks the libraries, creates the context, compiles the
    /// kernels for its architecture.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        let op = "open";
        let count = device_count()?;
        if ordinal >= count {
            return Err(KernelError::NoCuda(format!(
                "cuda:{ordinal} does not exist: this machine has {count} CUDA devices"
            )));
        }
        let err = |e| driver_error(op, ordinal, 0, e);
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        // One stream orders every operation, so cudarc's cross-stream events are not needed.
        // SAFETY: no buffer of this context is used on another stream.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(err)?;
        let (major, minor) = ctx.compute_capability().map_err(err)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| blas_error(op, ordinal, e))?;
        let mut functions = HashMap::new();
        for src in source::SOURCES {
            let ptx = source::compile(src, major as u32, minor as u32)?;
            let module = ctx.load_module(ptx).map_err(err)?;
            for &f in src.functions {
                functions.insert(f, module.load_function(f).map_err(err)?);
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
        self.bind("memory")?;
        self.ctx.mem_get_info().map_err(|e| driver_error("memory", self.ordinal, 0, e))
    }

    /// Waits for every queued operation.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_error("synchronize", self.ordinal, 0, e))
    }

    /// Makes the context current on the calling thread (cuBLAS needs it; cudarc's own calls
    /// bind it themselves).
    fn bind(&self, op: &'static str) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_error(op, self.ordinal, 0, e))
    }

    fn function(&self, name: &str) -> &CudaFunction {
        self.functions.get(name).unwrap_or_else(|| panic!("kernel `{name}` is not in any source's function list"))
    }

    // ---- memory ----

    /// A copy of `host` on the device (one zero for an empty slice: device allocations
    /// cannot be empty).
    pub(crate) fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, op: &'static str, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.zeros(op, 0);
        }
        let bytes = std::mem::size_of_val(host);
        self.stream.clone_htod(host).map_err(|e| driver_error(op, self.ordinal, bytes, e))
    }

    /// `n` zeros (at least one).
    pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, op: &'static str, n: usize) -> Result<CudaSlice<T>> {
        let n = n.max(1);
        let bytes = n.saturating_mul(std::mem::size_of::<T>());
        self.stream.alloc_zeros(n).map_err(|e| driver_error(op, self.ordinal, bytes, e))
    }

    /// `n` (at least one) uninitialised elements, for an output a kernel writes whole.
    ///
    /// # Safety
    /// Nothing may read an element before a kernel or copy has written it.
    unsafe fn alloc<T: DeviceRepr>(&self, op: &'static str, n: usize) -> Result<CudaSlice<T>> {
        let n = n.max(1);
        let bytes = count(op, &[n, std::mem::size_of::<T>()])?;
        // SAFETY: the caller's contract.
        unsafe { self.stream.alloc(n) }.map_err(|e| driver_error(op, self.ordinal, bytes, e))
    }

    /// The first `n` elements of `dev`, in host memory.
    pub(crate) fn download<T: DeviceRepr + Default + Clone>(
        &self,
        op: &'static str,
        dev: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        self.check(op, "source", dev, n)?;
        let mut host = vec![T::default(); n];
        if n > 0 {
            let err = |e| driver_error(op, self.ordinal, 0, e);
            self.stream.memcpy_dtoh(&dev.slice(..n), &mut host).map_err(err)?;
            self.synchronize()?;
        }
        Ok(host)
    }

    /// Copies a `[rows, cols]` weight matrix to the device in its format, with its scales
    /// where it is quantized (kept quantized: the products decode it in registers).
    pub(crate) fn upload_matrix(
        &self,
        op: &'static str,
        w: Weights<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<GpuMatrix> {
        // The format, the bytes of values and scales, and the row length the view says.
        let (format, values, scales, view_cols) = match w {
            Weights::F32(v) => (Format::F32, size_of_val(v), 0, cols),
            Weights::F16(v) => (Format::F16, size_of_val(v), 0, cols),
            Weights::BF16(v) => (Format::BF16, size_of_val(v), 0, cols),
            Weights::Mxfp4 { blocks, scales, cols } => (Format::Mxfp4, blocks.len(), scales.len(), cols),
            Weights::Fp8 { values, scales, cols, block } => {
                (Format::Fp8 { block }, values.len(), size_of_val(scales), cols)
            }
        };
        let (want_values, want_scales) = matrix_bytes(op, format, rows, cols)?;
        let what = |bytes: usize| format!("{bytes} bytes ({} [{rows}, {cols}])", format.name());
        if view_cols != cols {
            return Err(KernelError::shape(
                op,
                "weight",
                format!("rows of {cols} values"),
                format!("rows of {view_cols}"),
            ));
        }
        if values != want_values {
            return Err(KernelError::shape(op, "weight", what(want_values), format!("{values} bytes")));
        }
        if scales != want_scales {
            return Err(KernelError::shape(op, "scales", what(want_scales), format!("{scales} bytes")));
        }
        let (data, scales) = match w {
            Weights::F32(v) => (GpuData::F32(self.upload(op, v)?), None),
            Weights::F16(v) => (GpuData::Half(self.upload(op, v.reinterpret_cast())?), None),
            Weights::BF16(v) => (GpuData::Half(self.upload(op, v.reinterpret_cast())?), None),
            Weights::Mxfp4 { blocks, scales, .. } => {
                (GpuData::Bytes(self.upload(op, blocks)?), Some(GpuData::Bytes(self.upload(op, scales)?)))
            }
            Weights::Fp8 { values, scales, .. } => {
                (GpuData::Bytes(self.upload(op, values)?), Some(GpuData::F32(self.upload(op, scales)?)))
            }
        };
        Ok(GpuMatrix { format, rows, cols, ordinal: self.ordinal, data, scales })
    }

    // ---- checks ----

    /// Checks `s` is on this device and holds at least `n` elements: what a kernel may
    /// touch of it.
    fn check<T>(&self, op: &'static str, arg: &'static str, s: &CudaSlice<T>, n: usize) -> Result<()> {
        if s.ordinal() != self.ordinal {
            return Err(KernelError::WrongDevice {
                op,
                arg,
                expected: Device::Cuda(self.ordinal),
                got: Device::Cuda(s.ordinal()),
            });
        }
        if s.len() < n {
            return Err(KernelError::shape(op, arg, format!("at least {n} values"), format!("{} values", s.len())));
        }
        Ok(())
    }

    /// Checks `arg`, on device `ordinal`, is on this one.
    pub(crate) fn same_device(&self, op: &'static str, arg: &'static str, ordinal: usize) -> Result<()> {
        if ordinal != self.ordinal {
            let (expected, got) = (Device::Cuda(self.ordinal), Device::Cuda(ordinal));
            return Err(KernelError::WrongDevice { op, arg, expected, got });
        }
        Ok(())
    }

    /// Checks `w` is on this device and its buffers hold its `rows × cols` values and, for a
    /// quantized format, their scales ([`matrix_bytes`]).
    fn check_matrix(&self, op: &'static str, w: &GpuMatrix) -> Result<()> {
        let (values, scales) = matrix_bytes(op, w.format, w.rows, w.cols)?;
        self.same_device(op, "weight", w.ordinal)?;
        let short = |arg, want: usize, got: usize| {
            KernelError::shape(op, arg, format!("at least {want} bytes"), format!("{got} bytes"))
        };
        if w.data.bytes() < values {
            return Err(short("weight", values, w.data.bytes()));
        }
        match &w.scales {
            _ if scales == 0 => {}
            None => return Err(short("scales", scales, 0)),
            Some(s) if s.bytes() < scales => return Err(short("scales", scales, s.bytes())),
            Some(_) => {}
        }
        Ok(())
    }

    // ---- launches ----

    /// Launches kernel `name` over `cfg` with `args`, in the kernel's parameter order.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type, every address must be
    /// a buffer of this device, and each buffer must hold every element the kernel reads or
    /// writes for `cfg` and the sizes in `args`.
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
        unsafe { b.launch(cfg) }.map_err(|e| driver_error(name, self.ordinal, 0, e))?;
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
    Shape(attention::CacheShape),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_not_a_device_fault() {
        let e = driver_error("linear", 1, 4096, DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(e.is_out_of_memory() && !e.is_device_fault());
        assert_eq!(e.to_string(), "linear: out of memory on cuda:1 allocating 4096 bytes");
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(count("op", &[3, 4, 5]).unwrap(), 60);
        assert!(count("op", &[usize::MAX, 2]).is_err());
        assert_eq!(int("op", "rows", 7).unwrap(), 7);
        assert!(int("op", "rows", 1 << 31).is_err());
        assert!(grid("op", 1 << 31, 1, 32).is_err());
        assert!(grid("op", 1, 65_536, 32).is_err());
        assert_eq!(grid("op", 10, 3, 64).unwrap().grid_dim, (10, 3, 1));
    }

    #[test]
    fn matrix_bytes_count_values_and_scales() {
        // MXFP4: 16 bytes and one scale per 32 values; gpt-oss-20b's 90-block rows.
        assert_eq!(matrix_bytes("op", Format::Mxfp4, 4, 64).unwrap(), (128, 8));
        assert_eq!(matrix_bytes("op", Format::Mxfp4, 2, 2880).unwrap(), (2880, 180));
        assert!(matrix_bytes("op", Format::Mxfp4, 2, 48).is_err());
        // FP8: a byte a value, an f32 per block, partial edge blocks counted.
        assert_eq!(matrix_bytes("op", Format::Fp8 { block: [2, 3] }, 5, 7).unwrap(), (35, 3 * 3 * 4));
        assert_eq!(matrix_bytes("op", Format::Fp8 { block: [128, 128] }, 200, 320).unwrap(), (64_000, 2 * 3 * 4));
        assert!(matrix_bytes("op", Format::Fp8 { block: [0, 3] }, 5, 7).is_err());
        assert!(matrix_bytes("op", Format::Fp8 { block: [1, 1 << 31] }, 5, 7).is_err());
        // Dense formats have no scales; sizes that overflow are refused.
        assert_eq!(matrix_bytes("op", Format::BF16, 3, 5).unwrap(), (30, 0));
        assert_eq!(matrix_bytes("op", Format::F32, 3, 5).unwrap(), (60, 0));
        assert!(matrix_bytes("op", Format::F32, usize::MAX / 2, 1).is_err());
        assert!(matrix_bytes("op", Format::Fp8 { block: [1, 1] }, 1, usize::MAX / 2).is_err());
    }
}
