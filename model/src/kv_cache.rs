//! Per-sequence key/value cache: for every layer and KV head, the keys and values of the
//! positions seen so far, contiguous `[position, head_dim]` in `f32`.

use crate::config::ModelSpec;

pub struct SeqCache {
    /// `[layer][kv_head]` → `[position, head_dim]`.
    keys: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
    len: usize,
    head_dim: usize,
}

impl SeqCache {
    pub fn new(spec: &ModelSpec) -> Self {
        SeqCache {
            keys: vec![vec![Vec::new(); spec.num_kv_heads]; spec.num_layers],
            values: vec![vec![Vec::new(); spec.num_kv_heads]; spec.num_layers],
            len: 0,
            head_dim: spec.head_dim,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the new tokens' keys and values of `layer`, each `[token, kv_head, head_dim]`.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let heads = self.keys[layer].len();
        for (src, dst) in [(k, &mut self.keys[layer]), (v, &mut self.values[layer])] {
            for (i, row) in src.chunks_exact(hd).enumerate() {
                dst[i % heads].extend_from_slice(row);
            }
        }
    }

    /// Per KV head, the keys and values of `layer`.
    pub(crate) fn layer(&self, layer: usize) -> (Vec<&[f32]>, Vec<&[f32]>) {
        (self.keys[layer].iter().map(Vec::as_slice).collect(), self.values[layer].iter().map(Vec::as_slice).collect())
    }

    /// Marks `n` new positions as cached once every layer has appended them.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.keys.iter().flatten().all(|k| k.len() == self.len * self.head_dim));
    }

    /// Drops whatever a failed forward pass appended past the cached positions.
    pub(crate) fn rollback(&mut self) {
        let keep = self.len * self.head_dim;
        self.keys.iter_mut().chain(&mut self.values).flatten().for_each(|v| v.truncate(keep));
    }

    pub fn size_in_bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).flatten().map(|v| v.len() * 4).sum()
    }
}
