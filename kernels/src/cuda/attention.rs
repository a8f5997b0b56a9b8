//! The paged KV cache's writes and attention over it (`attention.cu`).

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

use super::{Arg, Gpu, Result};
use crate::KernelError;

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

impl Gpu {
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
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, shape.n_kv_heads as u32, 1),
            block_dim: (shape.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            self.p(k),
            self.p(v),
            self.p(arena),
            self.p(at.pos),
            self.p(at.table_at),
            self.p(at.tables),
            Arg::Shape(shape),
        ];
        // SAFETY: every token's position lies in a block its table lists, inside the arena.
        unsafe { self.launch("kv_write", cfg, &args) }
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
        let cfg =
            LaunchConfig { grid_dim: (tokens as u32, n_heads as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let args = [
            self.p(q),
            self.p(out),
            self.p(arena),
            self.p(at.pos),
            self.p(at.table_at),
            self.p(at.tables),
            sinks.map_or(Arg::Ptr(0), |s| self.p(s)),
            Arg::Shape(shape),
            Arg::I32(n_heads as i32),
            Arg::F32(1.0 / (shape.head_dim as f32).sqrt()),
            Arg::I32(sliding_window.map_or(0, |w| w as i32)),
        ];
        // SAFETY: as kv_write; q and out hold tokens × n_heads × head_dim.
        unsafe { self.launch("paged_attention", cfg, &args) }
    }
}
