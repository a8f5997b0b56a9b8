//! The paged KV cache: every sequence's keys and values live in fixed-size blocks of
//! [`BLOCK_TOKENS`] positions in one arena per [`KvPool`], on the backend the model runs on,
//! so memory is handed out and returned in equal pieces and never fragments. A sequence
//! reserves, when it starts, the blocks its whole generation may need (prompt +
//! `max_tokens`); it takes them from the pool as it grows and gives everything back when
//! dropped. A request the pool cannot hold yet waits; one it can never hold is refused.
//!
//! A block holds, for every layer and KV head, `BLOCK_TOKENS` rows of keys and of values
//! (`[layer][kv_head][k|v][position][head_dim]`, `f32`; see
//! [`switchyard_kernels::backend::KvLayout`]). The backend's `kv_write` and `attention`
//! address them through each sequence's block list.

use std::sync::{Arc, Mutex, MutexGuard};

use switchyard_kernels::backend::KvLayout;
use switchyard_kernels::{Backend, Device, Tensor};

use crate::config::ModelSpec;
use crate::error::Result;

pub use switchyard_kernels::backend::BLOCK_TOKENS;

/// Blocks needed for `tokens` positions.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

struct PoolState {
    /// Blocks not reserved by any sequence.
    available: usize,
    /// Blocks not taken, by arena index.
    free: Vec<u32>,
}

/// A fixed number of equal blocks in one arena, shared by every sequence of an engine.
pub struct KvPool {
    layout: KvLayout,
    capacity: usize,
    device: Device,
    /// Written and read by forward passes, one at a time.
    arena: Mutex<Tensor>,
    state: Mutex<PoolState>,
}

impl KvPool {
    /// The block layout of `spec`'s model.
    pub fn layout_for(spec: &ModelSpec) -> KvLayout {
        KvLayout { layers: spec.num_layers, kv_heads: spec.num_kv_heads, head_dim: spec.head_dim }
    }

    /// Floats of one block of `spec`'s model: keys and values of every layer and KV head.
    pub fn block_floats(spec: &ModelSpec) -> usize {
        Self::layout_for(spec).block_floats()
    }

    /// A pool of `capacity` blocks for `spec`'s model, on `backend`.
    pub fn new(backend: &dyn Backend, spec: &ModelSpec, capacity: usize) -> Result<Arc<Self>> {
        let layout = Self::layout_for(spec);
        let arena = backend.kv_arena(layout, capacity)?;
        Ok(Arc::new(KvPool {
            layout,
            capacity,
            device: backend.device(),
            arena: Mutex::new(arena),
            state: Mutex::new(PoolState { available: capacity, free: (0..capacity as u32).rev().collect() }),
        }))
    }

    /// A pool of as many blocks as fit in `bytes`.
    pub fn with_bytes(backend: &dyn Backend, spec: &ModelSpec, bytes: usize) -> Result<Arc<Self>> {
        Self::new(backend, spec, bytes / (Self::block_floats(spec) * 4).max(1))
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Where the arena is.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.layout.block_floats() * 4
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks no sequence has reserved.
    pub fn available(&self) -> usize {
        self.state.lock().expect("kv pool lock").available
    }

    /// The arena, for one forward pass.
    pub(crate) fn arena(&self) -> MutexGuard<'_, Tensor> {
        self.arena.lock().expect("kv arena lock")
    }

    /// Reserves `n` blocks, if that many are available.
    fn reserve(&self, n: usize) -> bool {
        let mut s = self.state.lock().expect("kv pool lock");
        if s.available < n {
            return false;
        }
        s.available -= n;
        true
    }

    fn take(&self) -> u32 {
        self.state.lock().expect("kv pool lock").free.pop().expect("a reserved block is always free")
    }

    fn give_back(&self, ids: Vec<u32>, reserved: usize) {
        let mut s = self.state.lock().expect("kv pool lock");
        s.available += reserved;
        s.free.extend(ids);
    }
}

/// One sequence's keys and values: the blocks it took from a [`KvPool`].
pub struct SeqCache {
    pool: Arc<KvPool>,
    /// Arena indices of the blocks taken, in position order.
    ids: Vec<u32>,
    /// Blocks reserved in the pool (taken or not yet).
    reserved: usize,
    len: usize,
}

impl SeqCache {
    /// A cache for up to `tokens` positions, reserving their blocks in `pool`; `None` when the
    /// pool has not that many blocks available now.
    pub fn reserve(pool: &Arc<KvPool>, tokens: usize) -> Option<Self> {
        let n = blocks_for(tokens);
        pool.reserve(n).then(|| SeqCache { pool: pool.clone(), ids: Vec::new(), reserved: n, len: 0 })
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this cache may hold.
    pub fn capacity(&self) -> usize {
        self.reserved * BLOCK_TOKENS
    }

    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// The blocks holding positions `0 .. end`, taking blocks from the reservation as needed.
    /// `None` if `end` is beyond the reservation.
    pub(crate) fn blocks(&mut self, end: usize) -> Option<&[u32]> {
        if blocks_for(end) > self.reserved {
            return None;
        }
        while self.ids.len() < blocks_for(end) {
            self.ids.push(self.pool.take());
        }
        Some(&self.ids)
    }

    /// Marks `n` new positions as cached once every layer has written them.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes of the blocks this sequence holds.
    pub fn size_in_bytes(&self) -> usize {
        self.ids.len() * self.pool.block_bytes()
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.ids), self.reserved);
    }
}

#[cfg(test)]
mod tests {
    use switchyard_kernels::CpuBackend;

    use super::*;

    fn spec() -> ModelSpec {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral");
        ModelSpec::from_dir(&dir).unwrap()
    }

    #[test]
    fn blocks_are_reserved_taken_and_returned() {
        let spec = spec();
        let pool = KvPool::new(&CpuBackend, &spec, 4).unwrap();
        let mut a = SeqCache::reserve(&pool, 3 * BLOCK_TOKENS).unwrap();
        assert_eq!(pool.available(), 1);
        assert!(SeqCache::reserve(&pool, 2 * BLOCK_TOKENS).is_none(), "only one block left");
        assert_eq!(a.blocks(BLOCK_TOKENS + 1).unwrap().len(), 2, "blocks are taken as positions need them");
        assert_eq!(a.size_in_bytes(), 2 * pool.block_bytes());
        assert!(a.blocks(3 * BLOCK_TOKENS + 1).is_none(), "no block beyond the reservation");
        drop(a);
        assert_eq!(pool.available(), 4);
        let mut b = SeqCache::reserve(&pool, 4 * BLOCK_TOKENS).unwrap();
        let mut ids = b.blocks(4 * BLOCK_TOKENS).unwrap().to_vec();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 1, 2, 3], "returned blocks are reused");
    }
}
