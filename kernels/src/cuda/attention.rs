//! The paged KV cache's writes and attention over it (`attention.cu`).
//!
//! The kernels find a token's cache rows through device tables (its position, and its
//! sequence's block table), so those tables are the one place an index could send a write
//! outside the arena. [`DeviceTables`] are only made by [`Gpu::device_tables`], which checks
//! every position and block on the host against the arena they were built for, and each
//! operation checks it is handed that arena's shape.

use cudarc::driver::{CudaSlice, DeviceRepr};

use super::{Arg, Gpu, count, grid, int};
use crate::backend::{BLOCK_TOKENS, KvLayout, SeqSpan};
use crate::error::{KernelError, Result};

/// The largest head dimension the attention kernel takes (`MAX_HEAD_DIM` in `attention.cu`).
pub const MAX_HEAD_DIM: usize = 256;
/// `kv_write` runs one thread per value of a head, so a head fits one block.
const MAX_BLOCK_THREADS: usize = 1024;

// `attention.cu` addresses the arena with a block of 16 positions.
const _: () = assert!(BLOCK_TOKENS == 16);

/// The shape of the KV arena a kernel call addresses (`CacheShape` in `attention.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct CacheShape {
    layer: i32,
    n_layers: i32,
    n_kv_heads: i32,
    head_dim: i32,
}

// SAFETY: `CacheShape` is `repr(C)` plain data, passed by value as in `attention.cu`.
unsafe impl DeviceRepr for CacheShape {}

/// A forward pass's sequences in the KV cache, on the device: per new token its position and
/// the offset of its sequence's block table in the flattened tables. Uploaded once per pass
/// and read by every layer's [`Gpu::kv_write`] and [`Gpu::paged_attention`].
pub(crate) struct DeviceTables {
    ordinal: usize,
    layout: KvLayout,
    /// Blocks of the arena every position and block was checked against.
    arena_blocks: usize,
    tokens: usize,
    pos: CudaSlice<i32>,
    table_at: CudaSlice<i32>,
    tables: CudaSlice<i32>,
}

/// One layer's attention options, as [`Gpu::paged_attention`] takes them.
pub(crate) struct AttentionArgs<'a> {
    pub layer: usize,
    pub heads: usize,
    pub scale: f32,
    pub sliding_window: Option<usize>,
    /// One logit per query head.
    pub sinks: Option<&'a CudaSlice<f32>>,
}

/// The host side of [`DeviceTables`]: per token its position and table offset, and the
/// tables, after checking every position lies in a listed block and every block in the arena.
#[derive(Debug)]
struct HostTables {
    pos: Vec<i32>,
    table_at: Vec<i32>,
    tables: Vec<i32>,
}

fn host_tables(op: &'static str, arena_blocks: usize, spans: &[SeqSpan<'_>]) -> Result<HostTables> {
    int(op, "arena blocks", arena_blocks)?;
    let mut t = HostTables { pos: Vec::new(), table_at: Vec::new(), tables: Vec::new() };
    for s in spans {
        let end = s.first_pos.checked_add(s.tokens).filter(|&e| e <= i32::MAX as usize);
        let end = end.ok_or_else(|| KernelError::Unsupported {
            op,
            message: format!("positions up to {} + {} exceed the CUDA kernels' {}", s.first_pos, s.tokens, i32::MAX),
        })?;
        let needed = end.div_ceil(BLOCK_TOKENS);
        if s.blocks.len() < needed {
            return Err(KernelError::OutOfRange {
                op,
                message: format!("positions up to {end} need {needed} blocks, {} given", s.blocks.len()),
            });
        }
        let blocks = &s.blocks[..needed];
        if let Some(&b) = blocks.iter().find(|&&b| b as usize >= arena_blocks) {
            return Err(KernelError::OutOfRange { op, message: format!("block {b} of an arena of {arena_blocks}") });
        }
        let at = int(op, "block tables", t.tables.len())?;
        // Below `arena_blocks`, which fits an i32 (checked above).
        t.tables.extend(blocks.iter().map(|&b| b as i32));
        t.pos.extend((s.first_pos..end).map(|p| p as i32));
        t.table_at.extend(std::iter::repeat_n(at, s.tokens));
    }
    int(op, "tokens", t.pos.len())?;
    Ok(t)
}

impl Gpu {
    /// The device tables of `spans`, each sequence's new tokens in an arena of `arena_blocks`
    /// blocks of `layout`, in row order.
    pub(crate) fn device_tables(
        &self,
        layout: KvLayout,
        arena_blocks: usize,
        spans: &[SeqSpan<'_>],
    ) -> Result<DeviceTables> {
        let op = "kv_batch";
        let t = host_tables(op, arena_blocks, spans)?;
        Ok(DeviceTables {
            ordinal: self.ordinal,
            layout,
            arena_blocks,
            tokens: t.pos.len(),
            pos: self.upload(op, &t.pos)?,
            table_at: self.upload(op, &t.table_at)?,
            tables: self.upload(op, &t.tables)?,
        })
    }

    /// Checks `t` was made on this device and `arena` holds the arena it was checked
    /// against, and returns the kernels' shape for `layer`.
    fn cache_shape(
        &self,
        op: &'static str,
        arena: &CudaSlice<f32>,
        t: &DeviceTables,
        layer: usize,
    ) -> Result<CacheShape> {
        self.same_device(op, "batch", t.ordinal)?;
        let l = &t.layout;
        if layer >= l.layers {
            return Err(KernelError::OutOfRange { op, message: format!("layer {layer} of {}", l.layers) });
        }
        let block_floats = count(op, &[l.layers, l.kv_heads, 2, BLOCK_TOKENS, l.head_dim])?;
        self.check(op, "arena", arena, count(op, &[t.arena_blocks, block_floats])?)?;
        Ok(CacheShape {
            layer: int(op, "layer", layer)?,
            n_layers: int(op, "layers", l.layers)?,
            n_kv_heads: int(op, "KV heads", l.kv_heads)?,
            head_dim: int(op, "head dimension", l.head_dim)?,
        })
    }

    /// Writes the new tokens' keys and values of one layer (`[tokens, kv_heads · head_dim]`)
    /// into the arena at their positions.
    pub(crate) fn kv_write(
        &self,
        arena: &mut CudaSlice<f32>,
        t: &DeviceTables,
        layer: usize,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> Result<()> {
        let op = "kv_write";
        let shape = self.cache_shape(op, arena, t, layer)?;
        let l = &t.layout;
        let n = count(op, &[t.tokens, l.kv_heads, l.head_dim])?;
        self.check(op, "k", k, n)?;
        self.check(op, "v", v, n)?;
        if n == 0 {
            return Ok(());
        }
        if l.head_dim > MAX_BLOCK_THREADS {
            return Err(KernelError::Unsupported {
                op,
                message: format!("head_dim {} exceeds the CUDA KV write's {MAX_BLOCK_THREADS}", l.head_dim),
            });
        }
        let cfg = grid(op, t.tokens, l.kv_heads, l.head_dim as u32)?;
        let args = [
            self.p(k),
            self.p(v),
            self.p(arena),
            self.p(&t.pos),
            self.p(&t.table_at),
            self.p(&t.tables),
            Arg::Shape(shape),
        ];
        // SAFETY: `device_tables` checked every token's position lies in a block its table
        // lists and every block lies in an arena of `arena_blocks` blocks of this layout,
        // which `arena` holds (checked by `cache_shape`, as is layer < layers); k and v hold
        // tokens × kv_heads × head_dim values (checked above); one thread per value.
        unsafe { self.launch("kv_write", cfg, &args) }
    }

    /// Causal attention of the new tokens' queries (`[tokens, heads · head_dim]`) over their
    /// sequences' cached positions: `[tokens, heads · head_dim]`.
    pub(crate) fn paged_attention(
        &self,
        q: &CudaSlice<f32>,
        arena: &CudaSlice<f32>,
        t: &DeviceTables,
        a: AttentionArgs<'_>,
    ) -> Result<CudaSlice<f32>> {
        let op = "attention";
        let shape = self.cache_shape(op, arena, t, a.layer)?;
        let l = &t.layout;
        if a.heads == 0 || l.kv_heads == 0 || !a.heads.is_multiple_of(l.kv_heads) || l.head_dim > MAX_HEAD_DIM {
            return Err(KernelError::Unsupported {
                op,
                message: format!(
                    "{} heads over {} KV heads of {} (the CUDA attention takes a multiple of the KV heads, of up to {MAX_HEAD_DIM})",
                    a.heads, l.kv_heads, l.head_dim
                ),
            });
        }
        let len = count(op, &[t.tokens, a.heads, l.head_dim])?;
        self.check(op, "q", q, len)?;
        if let Some(s) = a.sinks {
            self.check(op, "sinks", s, a.heads)?;
        }
        if len == 0 {
            return self.zeros(op, 0);
        }
        let cfg = grid(op, t.tokens, a.heads, 128)?;
        // A window at least as long as every sequence is no window; -1 is none.
        let window = a.sliding_window.map_or(-1, |w| w.min(i32::MAX as usize) as i32);
        // SAFETY: the launch below writes every head of every token.
        let out = unsafe { self.alloc::<f32>(op, len)? };
        let args = [
            self.p(q),
            self.p(&out),
            self.p(arena),
            self.p(&t.pos),
            self.p(&t.table_at),
            self.p(&t.tables),
            a.sinks.map_or(Arg::Ptr(0), |s| self.p(s)),
            Arg::Shape(shape),
            Arg::I32(a.heads as i32),
            Arg::F32(a.scale),
            Arg::I32(window),
        ];
        // SAFETY: as `kv_write` for the arena (every position a query sees is at most its
        // own, so in a listed block); q and out hold tokens × heads × head_dim values and
        // sinks one per head (checked above); head_dim fits the kernel's registers and
        // heads is a multiple of the KV heads.
        unsafe { self.launch("paged_attention", cfg, &args)? };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_list_each_tokens_position_and_sequence() {
        let (a, b) = ([3u32, 1], [0u32]);
        let spans = [SeqSpan { tokens: 2, first_pos: 15, blocks: &a }, SeqSpan { tokens: 1, first_pos: 0, blocks: &b }];
        let t = host_tables("kv_batch", 4, &spans).unwrap();
        assert_eq!(t.pos, vec![15, 16, 0]);
        assert_eq!(t.table_at, vec![0, 0, 2]);
        assert_eq!(t.tables, vec![3, 1, 0]);
    }

    #[test]
    fn tables_refuse_positions_and_blocks_outside_the_arena() {
        let one = [0u32];
        let past_blocks = SeqSpan { tokens: 2, first_pos: 15, blocks: &one };
        assert!(host_tables("kv_batch", 4, &[past_blocks]).unwrap_err().to_string().contains("need 2 blocks"));
        let far = [9u32];
        let outside = SeqSpan { tokens: 1, first_pos: 0, blocks: &far };
        assert!(host_tables("kv_batch", 4, &[outside]).unwrap_err().to_string().contains("block 9"));
        let huge = SeqSpan { tokens: 1, first_pos: i32::MAX as usize, blocks: &one };
        assert!(host_tables("kv_batch", 4, &[huge]).is_err());
    }
}
