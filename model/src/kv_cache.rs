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

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
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

/// A block's bookkeeping.
#[derive(Clone, Debug, Default)]
struct BlockMeta {
    /// Sequences holding it.
    refs: u32,
    /// Where it is registered for reuse: the hash of every token from the start of its
    /// sequence to its end, and its own tokens (checked on every hit, so a hash collision
    /// misses instead of serving another prompt's keys and values).
    cached: Option<(u64, Box<[u32]>)>,
    /// Since when it has sat unreferenced in the reuse list (its key there).
    idle_since: Option<u64>,
}

struct PoolState {
    blocks: Vec<BlockMeta>,
    /// Unreferenced blocks holding nothing worth keeping.
    free: Vec<u32>,
    /// Unreferenced blocks still registered for reuse, least recently used first: taken when
    /// `free` is empty, which unregisters them.
    idle: BTreeMap<u64, u32>,
    /// Blocks registered for reuse (held or idle), by hash.
    by_hash: HashMap<u64, u32>,
    /// Blocks sequences have reserved and not yet taken.
    outstanding: usize,
    /// Ticks for `idle`'s order.
    clock: u64,
    prefix_caching: bool,
}

impl PoolState {
    /// Blocks a new reservation may have: free, idle, less those promised.
    fn available(&self) -> usize {
        self.free.len() + self.idle.len() - self.outstanding
    }

    /// Drops a sequence's hold on `id`; unreferenced, it becomes idle (still reusable) or free.
    fn release(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        b.refs -= 1;
        if b.refs > 0 {
            return;
        }
        if b.cached.is_some() {
            self.clock += 1;
            b.idle_since = Some(self.clock);
            self.idle.insert(self.clock, id);
        } else {
            self.free.push(id);
        }
    }

    /// A hold on `id`, which was found by its hash.
    fn hold(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        if let Some(since) = b.idle_since.take() {
            self.idle.remove(&since);
        }
        b.refs += 1;
    }

    /// The registered block holding `tokens` after the prefix hashed `hash`, if any.
    fn lookup(&self, hash: u64, tokens: &[u32]) -> Option<u32> {
        let &id = self.by_hash.get(&hash)?;
        let (_, held) = self.blocks[id as usize].cached.as_ref()?;
        (**held == *tokens).then_some(id)
    }
}

/// How far the pool reused a prompt's blocks for a new sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixHit {
    /// Leading positions whose keys and values came from the cache (whole blocks).
    pub tokens: usize,
}

/// A fixed number of equal blocks in one arena, shared by every sequence of an engine.
///
/// With prefix caching on, a full block of a sequence is registered under a hash of every
/// token from its sequence's start to its end (and a salt: sequences of different salts
/// never share), and stays registered after its sequence ends, as long as no new block needs
/// its room (least recently used first). A new sequence whose prompt starts with registered
/// blocks holds them instead of computing them again; blocks are shared by reference count and
/// never written once full.
pub struct KvPool {
    layout: KvLayout,
    capacity: usize,
    device: Device,
    /// Written and read by forward passes, one at a time.
    arena: Mutex<Tensor>,
    state: Mutex<PoolState>,
    /// Keyed per process: nobody outside can aim a prompt at another's hash.
    hasher: RandomState,
}

impl KvPool {
    /// The block layout of `spec`'s model: keys and values per KV head, or MLA's latent rows.
    pub fn layout_for(spec: &ModelSpec) -> KvLayout {
        match &spec.mla {
            Some(m) => KvLayout::latent(spec.num_layers, m.cache_width()),
            None => KvLayout::per_head(spec.num_layers, spec.num_kv_heads, spec.head_dim),
        }
    }

    /// Floats of one block of `spec`'s model: keys and values of every layer and KV head, or
    /// every layer's latent rows (MLA).
    pub fn block_floats(spec: &ModelSpec) -> usize {
        Self::layout_for(spec).block_floats()
    }

    /// A pool of `capacity` blocks for `spec`'s model, on `backend`, prefix caching off.
    pub fn new(backend: &dyn Backend, spec: &ModelSpec, capacity: usize) -> Result<Arc<Self>> {
        let layout = Self::layout_for(spec);
        let arena = backend.kv_arena(layout, capacity)?;
        Ok(Arc::new(KvPool {
            layout,
            capacity,
            device: backend.device(),
            arena: Mutex::new(arena),
            state: Mutex::new(PoolState {
                blocks: vec![BlockMeta::default(); capacity],
                free: (0..capacity as u32).rev().collect(),
                idle: BTreeMap::new(),
                by_hash: HashMap::new(),
                outstanding: 0,
                clock: 0,
                prefix_caching: false,
            }),
            hasher: RandomState::new(),
        }))
    }

    /// A pool of as many blocks as fit in `bytes`.
    pub fn with_bytes(backend: &dyn Backend, spec: &ModelSpec, bytes: usize) -> Result<Arc<Self>> {
        Self::new(backend, spec, bytes / (Self::block_floats(spec) * 4).max(1))
    }

    /// Turns prefix caching on or off for the sequences reserved from now on (off also forgets
    /// every registered block, and registers no more).
    pub fn set_prefix_caching(&self, on: bool) {
        let mut s = self.state();
        s.prefix_caching = on;
        if !on {
            s.by_hash.clear();
            let idle = std::mem::take(&mut s.idle);
            s.free.extend(idle.into_values());
            for b in &mut s.blocks {
                b.cached = None;
                b.idle_since = None;
            }
        }
    }

    pub fn prefix_caching(&self) -> bool {
        self.state().prefix_caching
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

    /// Blocks a new sequence may reserve: those no sequence holds or has reserved (idle
    /// cached blocks included: they are given up when needed).
    pub fn available(&self) -> usize {
        self.state().available()
    }

    /// Blocks some sequence holds.
    pub fn held(&self) -> usize {
        self.state().blocks.iter().filter(|b| b.refs > 0).count()
    }

    /// Blocks registered for reuse (held or idle).
    pub fn cached(&self) -> usize {
        self.state().by_hash.len()
    }

    /// The arena, for one forward pass.
    pub(crate) fn arena(&self) -> MutexGuard<'_, Tensor> {
        self.arena.lock().expect("kv arena lock")
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().expect("kv pool lock")
    }

    /// The hash a prefix starts from: sequences of different salts share nothing.
    fn seed(&self, salt: &str) -> u64 {
        self.hasher.hash_one(("switchyard kv prefix", salt))
    }

    fn chain(&self, parent: u64, tokens: &[u32]) -> u64 {
        self.hasher.hash_one((parent, tokens))
    }

    /// The registered blocks `prompt` starts with, at most `max_blocks` of them.
    fn matching(&self, s: &PoolState, prompt: &[u32], salt: &str, max_blocks: usize) -> (Vec<u32>, Vec<u64>) {
        let (mut ids, mut hashes) = (Vec::new(), Vec::new());
        if !s.prefix_caching {
            return (ids, hashes);
        }
        let mut hash = self.seed(salt);
        for tokens in prompt.chunks_exact(BLOCK_TOKENS).take(max_blocks) {
            hash = self.chain(hash, tokens);
            let Some(id) = s.lookup(hash, tokens) else { break };
            ids.push(id);
            hashes.push(hash);
        }
        (ids, hashes)
    }

    /// Blocks a sequence of `tokens` positions whose prompt is `prompt` would need from
    /// [`KvPool::available`] now, counting the blocks of its prefix it would share.
    pub fn blocks_needed(&self, tokens: usize, prompt: &[u32], salt: &str, max_hit: usize) -> usize {
        let s = self.state();
        let (ids, _) = self.matching(&s, prompt, salt, (max_hit / BLOCK_TOKENS).min(blocks_for(tokens)));
        let live = ids.iter().filter(|&&id| s.blocks[id as usize].refs > 0).count();
        blocks_for(tokens) - live
    }

    fn take(&self) -> u32 {
        let mut s = self.state();
        s.outstanding -= 1;
        let id = match s.free.pop() {
            Some(id) => id,
            None => {
                // The least recently used idle block gives up its registration.
                let (_, id) = s.idle.pop_first().expect("a reserved block is always free or idle");
                let b = &mut s.blocks[id as usize];
                b.idle_since = None;
                let (hash, _) = b.cached.take().expect("idle blocks are registered");
                if s.by_hash.get(&hash) == Some(&id) {
                    s.by_hash.remove(&hash);
                }
                id
            }
        };
        s.blocks[id as usize].refs = 1;
        id
    }

    /// Registers `id`, full with `tokens`, under `hash`, unless a block already holds that
    /// prefix (then `id` stays unregistered and is freed with its sequence).
    fn register(&self, id: u32, hash: u64, tokens: &[u32]) {
        let mut s = self.state();
        if !s.prefix_caching || s.by_hash.contains_key(&hash) {
            return;
        }
        s.by_hash.insert(hash, id);
        s.blocks[id as usize].cached = Some((hash, tokens.into()));
    }

    fn give_back(&self, ids: Vec<u32>, untaken: usize) {
        let mut s = self.state();
        s.outstanding -= untaken;
        // Last block first: a prefix's tail is given up before its head, which more prompts share.
        for id in ids.into_iter().rev() {
            s.release(id);
        }
    }
}

/// One sequence's keys and values: the blocks it took from a [`KvPool`] or shares with
/// others.
pub struct SeqCache {
    pool: Arc<KvPool>,
    /// Arena indices of the blocks held, in position order.
    ids: Vec<u32>,
    /// Blocks this sequence may hold (held, or reserved in the pool and not yet taken).
    reserved: usize,
    len: usize,
    /// Whether the pool cached prefixes when the cache was reserved: if not, its blocks are
    /// never registered (the per-step check costs no lock).
    caching: bool,
    /// The salt its blocks are registered under, and the hash of each full block so far.
    salt: String,
    hashes: Vec<u64>,
    hit: PrefixHit,
}

impl SeqCache {
    /// A cache for up to `tokens` positions, reserving their blocks in `pool`; `None` when the
    /// pool has not that many blocks available now.
    pub fn reserve(pool: &Arc<KvPool>, tokens: usize) -> Option<Self> {
        Self::reserve_for(pool, tokens, &[], "", 0)
    }

    /// [`SeqCache::reserve`] for a sequence that starts with `prompt`: where prefix caching
    /// is on, the registered blocks (of `salt`) the prompt starts with, up to `max_hit`
    /// positions, are shared rather than reserved, and the cache starts that long.
    pub fn reserve_for(pool: &Arc<KvPool>, tokens: usize, prompt: &[u32], salt: &str, max_hit: usize) -> Option<Self> {
        let n = blocks_for(tokens);
        let mut s = pool.state();
        let (ids, hashes) = pool.matching(&s, prompt, salt, (max_hit / BLOCK_TOKENS).min(n));
        let live = ids.iter().filter(|&&id| s.blocks[id as usize].refs > 0).count();
        if s.available() < n - live {
            return None;
        }
        for &id in &ids {
            s.hold(id);
        }
        s.outstanding += n - ids.len();
        let caching = s.prefix_caching;
        drop(s);
        let hit = PrefixHit { tokens: ids.len() * BLOCK_TOKENS };
        let salt = salt.to_string();
        Some(SeqCache { pool: pool.clone(), len: hit.tokens, ids, reserved: n, caching, salt, hashes, hit })
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

    /// What the pool reused when the cache was reserved.
    pub fn prefix_hit(&self) -> PrefixHit {
        self.hit
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

    /// Registers every block filled since the last call for reuse (where the pool caches
    /// prefixes); `token_at(p)` is the token at position `p`.
    pub(crate) fn register_full_blocks(&mut self, token_at: impl Fn(usize) -> u32) {
        if !self.caching {
            return;
        }
        while (self.hashes.len() + 1) * BLOCK_TOKENS <= self.len {
            let i = self.hashes.len();
            let tokens: Vec<u32> = (i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS).map(&token_at).collect();
            let parent = self.hashes.last().copied().unwrap_or_else(|| self.pool.seed(&self.salt));
            let hash = self.pool.chain(parent, &tokens);
            self.pool.register(self.ids[i], hash, &tokens);
            self.hashes.push(hash);
        }
    }

    /// Bytes of the blocks this sequence holds.
    pub fn size_in_bytes(&self) -> usize {
        self.ids.len() * self.pool.block_bytes()
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        let untaken = self.reserved - self.ids.len();
        self.pool.give_back(std::mem::take(&mut self.ids), untaken);
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

    fn caching_pool(blocks: usize) -> Arc<KvPool> {
        let pool = KvPool::new(&CpuBackend, &spec(), blocks).unwrap();
        pool.set_prefix_caching(true);
        pool
    }

    /// Fills `cache` up to `tokens.len()` positions as forward passes do, registering its full
    /// blocks.
    fn fill(cache: &mut SeqCache, tokens: &[u32]) {
        cache.blocks(tokens.len()).unwrap();
        cache.advance(tokens.len() - cache.len());
        cache.register_full_blocks(|p| tokens[p]);
    }

    #[test]
    fn a_prompt_shares_the_full_blocks_of_an_earlier_prefix_of_its_salt() {
        let pool = caching_pool(16);
        let prompt: Vec<u32> = (0..40).collect(); // two full blocks and 8 positions
        let mut a = SeqCache::reserve_for(&pool, 48, &prompt, "", 39).unwrap();
        assert_eq!(a.prefix_hit().tokens, 0, "nothing cached yet");
        fill(&mut a, &prompt);
        assert_eq!(pool.cached(), 2, "only full blocks are registered");

        let b = SeqCache::reserve_for(&pool, 48, &prompt, "", 39).unwrap();
        assert_eq!((b.prefix_hit().tokens, b.len()), (32, 32));
        assert_eq!(b.ids, a.ids[..2], "the same blocks, shared");
        assert_eq!(pool.available(), 16 - 3 - 1, "a shared block is reserved once");
        assert_eq!(pool.blocks_needed(48, &prompt, "", 39), 1);

        let mut other = prompt.clone();
        other[20] += 1;
        let c = SeqCache::reserve_for(&pool, 48, &other, "", 39).unwrap();
        assert_eq!(c.prefix_hit().tokens, 16, "a prompt that differs in its second block shares the first");
        let d = SeqCache::reserve_for(&pool, 48, &prompt, "another tenant", 39).unwrap();
        assert_eq!(d.prefix_hit().tokens, 0, "another salt shares nothing");
        let e = SeqCache::reserve_for(&pool, 33, &prompt[..32], "", 31).unwrap();
        assert_eq!(e.prefix_hit().tokens, 16, "the last prompt position is always computed");

        drop((a, b, c, d, e));
        assert_eq!((pool.held(), pool.available()), (0, 16), "every hold is given back");
        assert_eq!(pool.cached(), 2, "registered blocks outlive their sequences");
        pool.set_prefix_caching(false);
        assert_eq!(pool.cached(), 0);
        assert_eq!(SeqCache::reserve_for(&pool, 48, &prompt, "", 39).unwrap().prefix_hit().tokens, 0);
    }

    #[test]
    fn idle_blocks_give_way_tail_first_and_are_never_found_again() {
        let pool = caching_pool(4);
        let first: Vec<u32> = (0..33).collect();
        let second: Vec<u32> = (100..133).collect();
        let mut a = SeqCache::reserve_for(&pool, 33, &first, "", 32).unwrap();
        fill(&mut a, &first);
        drop(a);
        assert_eq!((pool.available(), pool.cached()), (4, 2), "idle registered blocks count as available");

        // Three blocks from two free ones and the least recently used idle one: the tail of
        // `first`, given back before its head.
        let mut b = SeqCache::reserve_for(&pool, 33, &second, "", 32).unwrap();
        fill(&mut b, &second);
        assert_eq!(pool.cached(), 3);
        drop(b);
        let again = SeqCache::reserve_for(&pool, 33, &first, "", 32).unwrap();
        assert_eq!(again.prefix_hit().tokens, 16, "the head is still there, the tail is not");
        assert!(SeqCache::reserve_for(&pool, 4 * BLOCK_TOKENS, &[], "", 0).is_none(), "one block is held");
        drop(again);
        assert_eq!((pool.held(), pool.available()), (0, 4));
    }
}
