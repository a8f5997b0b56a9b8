//! Per-sequence key/value cache: every layer's keys and values for the positions seen so far,
//! `[position, kv_head, head_dim]` in `f32`.

use crate::config::ModelSpec;

pub struct SeqCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    stride: usize,
}

impl SeqCache {
    pub fn new(spec: &ModelSpec) -> Self {
        SeqCache {
            keys: vec![Vec::new(); spec.num_layers],
            values: vec![Vec::new(); spec.num_layers],
            len: 0,
            stride: spec.num_kv_heads * spec.head_dim,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the new tokens' keys and values of `layer`.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        self.keys[layer].extend_from_slice(k);
        self.values[layer].extend_from_slice(v);
    }

    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Marks `n` new positions as cached once every layer has appended them.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.keys.iter().all(|k| k.len() == self.len * self.stride));
    }

    pub fn size_in_bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|v| v.len() * 4).sum()
    }
}
