//! The paged KV cache: every sequence's keys and values live in fixed-size blocks of
//! [`BLOCK_TOKENS`] positions taken from a [`KvPool`], so memory is handed out and returned
//! in equal pieces and never fragments. A sequence reserves, when it starts, the blocks its
//! whole generation may need (prompt + `max_tokens`); it takes them from the pool as it grows
//! and gives everything back when dropped. A request the pool cannot hold yet waits; one it
//! can never hold is refused.
//!
//! A block holds, for every layer and KV head, `BLOCK_TOKENS` rows of keys and of values
//! (`[layer][kv_head][k|v][position][head_dim]`, `f32`). Attention reads a head's rows
//! gathered from the sequence's blocks in order.

use std::sync::{Arc, Mutex};

use crate::config::ModelSpec;

/// Positions per block.
pub const BLOCK_TOKENS: usize = 16;

/// Blocks needed for `tokens` positions.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

struct PoolState {
    /// Blocks not reserved by any sequence.
    available: usize,
    /// Returned blocks, kept for reuse.
    free: Vec<Box<[f32]>>,
    /// Device pools: the arena indices of blocks not taken.
    free_ids: Vec<u32>,
}

/// A fixed number of equal blocks shared by every sequence of an engine.
///
/// A host pool hands out blocks of memory; a device pool (the CUDA backend's) hands out
/// indices into a block arena in device memory, which the GPU forward pass writes and reads.
pub struct KvPool {
    capacity: usize,
    block_floats: usize,
    on_device: bool,
    state: Mutex<PoolState>,
}

impl KvPool {
    /// Floats of one block of `spec`'s model: keys and values of every layer and KV head.
    pub fn block_floats(spec: &ModelSpec) -> usize {
        spec.num_layers * spec.num_kv_heads * 2 * BLOCK_TOKENS * spec.head_dim
    }

    /// A pool of `capacity` blocks for `spec`'s model.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Arc<Self> {
        let block_floats = Self::block_floats(spec);
        Arc::new(KvPool {
            capacity,
            block_floats,
            on_device: false,
            state: Mutex::new(PoolState { available: capacity, free: Vec::new(), free_ids: Vec::new() }),
        })
    }

    /// A pool of the `capacity` blocks of a device arena, handed out as indices.
    pub fn for_device_arena(spec: &ModelSpec, capacity: usize) -> Arc<Self> {
        Arc::new(KvPool {
            capacity,
            block_floats: Self::block_floats(spec),
            on_device: true,
            state: Mutex::new(PoolState {
                available: capacity,
                free: Vec::new(),
                free_ids: (0..capacity as u32).rev().collect(),
            }),
        })
    }

    /// Whether blocks live in a device arena.
    pub fn on_device(&self) -> bool {
        self.on_device
    }

    /// A pool of as many blocks as fit in `bytes`.
    pub fn with_bytes(spec: &ModelSpec, bytes: usize) -> Arc<Self> {
        Self::new(spec, bytes / (Self::block_floats(spec) * 4).max(1))
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.block_floats * 4
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks no sequence has reserved.
    pub fn available(&self) -> usize {
        self.state.lock().expect("kv pool lock").available
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

    fn take(&self) -> Box<[f32]> {
        let reused = self.state.lock().expect("kv pool lock").free.pop();
        reused.unwrap_or_else(|| vec![0.0f32; self.block_floats].into_boxed_slice())
    }

    fn take_id(&self) -> u32 {
        self.state.lock().expect("kv pool lock").free_ids.pop().expect("a reserved block is always free")
    }

    fn give_back(&self, blocks: Vec<Box<[f32]>>, ids: Vec<u32>, reserved: usize) {
        let mut s = self.state.lock().expect("kv pool lock");
        s.available += reserved;
        s.free.extend(blocks);
        s.free_ids.extend(ids);
    }
}

/// One sequence's keys and values, in blocks from a [`KvPool`].
pub struct SeqCache {
    pool: Arc<KvPool>,
    blocks: Vec<Box<[f32]>>,
    /// Arena indices of the blocks taken from a device pool.
    ids: Vec<u32>,
    /// Blocks reserved in the pool (taken or not yet).
    reserved: usize,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl SeqCache {
    /// A cache with a pool of its own, large enough for the model's whole context.
    pub fn new(spec: &ModelSpec) -> Self {
        let blocks = blocks_for(spec.max_context);
        Self::reserve(&KvPool::new(spec, blocks), spec, spec.max_context).expect("a pool of its own has room")
    }

    /// A cache for up to `tokens` positions, reserving their blocks in `pool`; `None` when the
    /// pool has not that many blocks available now.
    pub fn reserve(pool: &Arc<KvPool>, spec: &ModelSpec, tokens: usize) -> Option<Self> {
        let n = blocks_for(tokens);
        pool.reserve(n).then(|| SeqCache {
            pool: pool.clone(),
            blocks: Vec::new(),
            ids: Vec::new(),
            reserved: n,
            len: 0,
            kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
        })
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

    /// Floats of one layer in a block, and of one head's keys (or values) in it.
    fn strides(&self) -> (usize, usize) {
        let head = BLOCK_TOKENS * self.head_dim;
        (self.kv_heads * 2 * head, head)
    }

    /// Offset in a block of `layer`, KV head `g`, keys (`kv = 0`) or values (`1`).
    fn offset(&self, layer: usize, g: usize, kv: usize) -> usize {
        let (layer_stride, head) = self.strides();
        layer * layer_stride + (g * 2 + kv) * head
    }

    /// Appends the new tokens' keys and values of `layer`, each `[token, kv_head, head_dim]`,
    /// at positions `len ..`.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (hd, heads) = (self.head_dim, self.kv_heads);
        let n = k.len() / (hd * heads);
        let end = self.len + n;
        assert!(blocks_for(end) <= self.reserved, "KV cache: {end} positions exceed the {} reserved", self.capacity());
        while self.blocks.len() < blocks_for(end) {
            self.blocks.push(self.pool.take());
        }
        for t in 0..n {
            let pos = self.len + t;
            let (b, row) = (pos / BLOCK_TOKENS, pos % BLOCK_TOKENS);
            for g in 0..heads {
                let src = (t * heads + g) * hd;
                for (kv, from) in [(0, k), (1, v)] {
                    let dst = self.offset(layer, g, kv) + row * hd;
                    self.blocks[b][dst..dst + hd].copy_from_slice(&from[src..src + hd]);
                }
            }
        }
    }

    /// Per KV head, the keys and values of `layer` for positions `0 .. len + new`, gathered
    /// from the blocks in order (`new` positions appended but not yet advanced).
    pub(crate) fn layer(&self, layer: usize, new: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let (hd, total) = (self.head_dim, self.len + new);
        let gather = |kv: usize| -> Vec<Vec<f32>> {
            (0..self.kv_heads)
                .map(|g| {
                    let mut out = Vec::with_capacity(total * hd);
                    let off = self.offset(layer, g, kv);
                    for (b, block) in self.blocks.iter().enumerate() {
                        let rows = total.saturating_sub(b * BLOCK_TOKENS).min(BLOCK_TOKENS);
                        out.extend_from_slice(&block[off..off + rows * hd]);
                    }
                    out
                })
                .collect()
        };
        (gather(0), gather(1))
    }

    /// Whether this cache's blocks live in a device arena.
    pub fn on_device(&self) -> bool {
        self.pool.on_device
    }

    /// The arena indices of the device blocks holding positions `0 .. end`, taking blocks
    /// from the pool as needed.
    pub fn device_blocks(&mut self, end: usize) -> &[u32] {
        assert!(self.pool.on_device, "device_blocks on a host KV cache");
        assert!(blocks_for(end) <= self.reserved, "KV cache: {end} positions exceed the {} reserved", self.capacity());
        while self.ids.len() < blocks_for(end) {
            self.ids.push(self.pool.take_id());
        }
        &self.ids
    }

    /// Marks `n` new positions as cached once every layer has appended them.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes of the blocks this sequence holds.
    pub fn size_in_bytes(&self) -> usize {
        (self.blocks.len() + self.ids.len()) * self.pool.block_bytes()
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.blocks), std::mem::take(&mut self.ids), self.reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral");
        ModelSpec::from_dir(&dir).unwrap()
    }

    #[test]
    fn blocks_are_reserved_taken_and_returned() {
        let spec = spec();
        let pool = KvPool::new(&spec, 4);
        let a = SeqCache::reserve(&pool, &spec, 3 * BLOCK_TOKENS).unwrap();
        assert_eq!(pool.available(), 1);
        assert!(SeqCache::reserve(&pool, &spec, 2 * BLOCK_TOKENS).is_none(), "only one block left");
        drop(a);
        assert_eq!(pool.available(), 4);
    }

    #[test]
    fn rows_come_back_in_order_across_blocks() {
        let spec = spec();
        let (heads, hd) = (spec.num_kv_heads, spec.head_dim);
        let mut cache = SeqCache::reserve(&KvPool::new(&spec, 8), &spec, 40).unwrap();
        let n = BLOCK_TOKENS + 5;
        let k: Vec<f32> = (0..n * heads * hd).map(|i| i as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        for l in 0..spec.num_layers {
            cache.append(l, &k, &v);
        }
        cache.advance(n);
        let (keys, values) = cache.layer(1, 0);
        for g in 0..heads {
            for t in 0..n {
                let want = &k[(t * heads + g) * hd..(t * heads + g + 1) * hd];
                assert_eq!(&keys[g][t * hd..(t + 1) * hd], want);
                assert_eq!(values[g][t * hd], -want[0]);
            }
        }
        assert_eq!(cache.size_in_bytes(), 2 * KvPool::new(&spec, 1).block_bytes());
    }
}
