//! Safetensors checkpoints as the Hub ships them: one `model.safetensors`, or shards listed
//! in `model.safetensors.index.json`. Files are memory-mapped; a [`Tensor`] is a typed view
//! into the map (no copy), so the OS pages weights in on first use and a process that
//! touches only some experts never reads the rest.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::Dtype as StDtype;
use switchyard_kernels::{DType, HostBytes, Weight, Weights};

use crate::error::{ModelError, Result};

/// Bytes a tensor borrows from: a mapped file or an owned, 8-byte-aligned buffer.
enum Backing {
    Mapped(Mmap),
    Owned(Vec<u64>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => {
                // SAFETY: a u64 buffer viewed as bytes; alignment only decreases.
                unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 8) }
            }
        }
    }
}

impl AsRef<[u8]> for Backing {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

/// A tensor of a checkpoint: dtype, shape and a view of its bytes.
#[derive(Clone)]
pub struct Tensor {
    name: Arc<str>,
    dtype: DType,
    shape: Vec<usize>,
    backing: Arc<Backing>,
    /// Byte offset of the first element in `backing`.
    offset: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {:?} {:?})", self.name, self.dtype, self.shape)
    }
}

impl Tensor {
    /// A tensor that owns a copy of `bytes` (quantized data: random checkpoints, tests).
    pub fn from_bytes(name: &str, dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>() * dtype.size_in_bytes(),
            bytes.len(),
            "from_bytes: shape does not match bytes"
        );
        Self::owned(name, dtype, shape, bytes)
    }

    /// A tensor that owns a copy of `values` converted to the float `dtype` (random
    /// checkpoints, tests).
    pub fn from_f32(name: &str, dtype: DType, shape: Vec<usize>, values: &[f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "from_f32: shape does not match values");
        let bytes = encode(dtype, values);
        Self::owned(name, dtype, shape, &bytes)
    }

    fn owned(name: &str, dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Self {
        let mut buf = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: the u64 buffer holds at least `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.as_mut_ptr() as *mut u8, bytes.len()) };
        Tensor { name: name.into(), dtype, shape, backing: Arc::new(Backing::Owned(buf)), offset: 0 }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn size_in_bytes(&self) -> usize {
        self.len() * self.dtype.size_in_bytes()
    }

    fn bytes(&self) -> &[u8] {
        &self.backing.bytes()[self.offset..self.offset + self.size_in_bytes()]
    }

    /// The elements as a typed view, for a float dtype.
    pub fn weights(&self) -> Option<Weights<'_>> {
        let b = self.bytes();
        let n = self.len();
        // SAFETY: construction guarantees the view is aligned for its dtype (misaligned
        // mapped tensors are copied into an aligned buffer) and holds `n` elements; every
        // bit pattern is a valid f32/f16/bf16.
        unsafe {
            match self.dtype {
                DType::F32 => Some(Weights::F32(std::slice::from_raw_parts(b.as_ptr() as *const f32, n))),
                DType::F16 => Some(Weights::F16(std::slice::from_raw_parts(b.as_ptr() as *const f16, n))),
                DType::BF16 => Some(Weights::BF16(std::slice::from_raw_parts(b.as_ptr() as *const bf16, n))),
                DType::U8 | DType::F8E4M3 => None,
            }
        }
    }

    /// The elements as `f32`, for a float dtype (norms, biases, scales).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        self.weights().map(|w| w.to_f32_vec()).ok_or_else(|| ModelError::UnsupportedDtype {
            tensor: self.name.to_string(),
            dtype: self.dtype.name().to_string(),
            expected: "expected F32, F16 or BF16",
        })
    }

    /// The raw bytes, for quantized data.
    pub fn raw_bytes(&self) -> &[u8] {
        self.bytes()
    }

    /// The bytes, shared with the mapped file (no copy).
    pub fn host_bytes(&self) -> HostBytes {
        HostBytes::new(self.backing.clone(), self.offset..self.offset + self.size_in_bytes())
            .expect("a tensor's bytes lie inside its file")
    }

    /// This matrix (`[out, in]`, a float dtype) and an optional `bias` (`[out]`) as a host
    /// [`Weight`].
    pub fn to_weight(&self, bias: Option<&Tensor>) -> Result<Weight> {
        let &[rows, cols] = self.shape.as_slice() else {
            return Err(ModelError::ShapeMismatch {
                tensor: self.name.to_string(),
                expected: vec![0, 0],
                got: self.shape.clone(),
            });
        };
        if !self.dtype.is_float() {
            return Err(ModelError::UnsupportedDtype {
                tensor: self.name.to_string(),
                dtype: self.dtype.name().to_string(),
                expected: "a dense weight must be F32, F16 or BF16 (quantized ones come with their scales)",
            });
        }
        let bias = bias.map(Tensor::to_f32_vec).transpose()?;
        Ok(Weight::host(self.dtype.into(), rows, cols, self.host_bytes(), bias)?)
    }

    /// Checks every value is finite, naming the tensor and its first NaN or infinity. For the
    /// small tensors scanned at load time (norms, biases, gates, sinks, scales); a tensor of
    /// a quantized dtype is not decoded here and passes.
    pub fn expect_finite(self) -> Result<Self> {
        if let Some(w) = self.weights() {
            check_finite(&self.name, &w.to_f32_vec())?;
        }
        Ok(self)
    }

    /// Checks the shape, naming the tensor when it differs.
    pub fn expect_shape(self, expected: &[usize]) -> Result<Self> {
        if self.shape != expected {
            return Err(ModelError::ShapeMismatch {
                tensor: self.name.to_string(),
                expected: expected.to_vec(),
                got: self.shape,
            });
        }
        Ok(self)
    }

    /// Entry `i` along the first dimension (one expert of a fused `[E, ...]` tensor), no copy.
    pub fn index(&self, i: usize) -> Tensor {
        assert!(i < self.shape[0], "index {i} out of range for {:?}", self);
        let inner: usize = self.shape[1..].iter().product();
        Tensor {
            name: format!("{}[{i}]", self.name).into(),
            dtype: self.dtype,
            shape: self.shape[1..].to_vec(),
            backing: self.backing.clone(),
            offset: self.offset + i * inner * self.dtype.size_in_bytes(),
        }
    }

    /// Rows `start..end` of a matrix, no copy.
    pub fn rows(&self, start: usize, end: usize) -> Tensor {
        assert!(start <= end && end <= self.shape[0], "rows {start}..{end} out of range for {:?}", self);
        let inner: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        Tensor {
            name: self.name.clone(),
            dtype: self.dtype,
            shape,
            backing: self.backing.clone(),
            offset: self.offset + start * inner * self.dtype.size_in_bytes(),
        }
    }

    /// The transpose of a matrix, materialised in the same dtype (for checkpoints that store
    /// `[in, out]` where the kernels read `[out, in]`).
    pub fn transposed(&self) -> Tensor {
        assert_eq!(self.shape.len(), 2, "transpose of a non-matrix {:?}", self);
        let (r, c) = (self.shape[0], self.shape[1]);
        let es = self.dtype.size_in_bytes();
        let src = self.bytes();
        let mut dst = vec![0u8; src.len()];
        for i in 0..r {
            for j in 0..c {
                let (s, d) = ((i * c + j) * es, (j * r + i) * es);
                dst[d..d + es].copy_from_slice(&src[s..s + es]);
            }
        }
        Self::owned(&self.name, self.dtype, vec![c, r], &dst)
    }
}

/// Checks the values of `tensor` are all finite, naming it and its first NaN or infinity.
pub fn check_finite(tensor: &str, values: &[f32]) -> Result<()> {
    let count = values.iter().filter(|v| !v.is_finite()).count();
    match values.iter().position(|v| !v.is_finite()) {
        Some(first) => Err(ModelError::NonFiniteTensor { tensor: tensor.to_string(), count, first }),
        None => Ok(()),
    }
}

fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    switchyard_kernels::Format::from(dtype).encode(values)
}

struct Entry {
    file: usize,
    dtype: std::result::Result<DType, String>,
    shape: Vec<usize>,
    /// Byte range inside the file.
    start: usize,
}

/// The tensors of a checkpoint directory, by name.
pub struct Checkpoint {
    files: Vec<(PathBuf, Arc<Backing>)>,
    entries: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` and its shards, or `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text =
                std::fs::read_to_string(&index).map_err(|source| ModelError::Io { path: index.clone(), source })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::InvalidJson { file: index.clone(), message: e.to_string() })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::InvalidJson {
                file: index.clone(),
                message: "missing `weight_map` object".into(),
            })?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            return Err(ModelError::NotACheckpoint {
                path: dir.to_path_buf(),
                reason: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };
        let mut ckpt = Checkpoint { files: Vec::new(), entries: HashMap::new() };
        for path in files {
            ckpt.add_file(path)?;
        }
        Ok(ckpt)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
        // SAFETY: checkpoints are read-only inputs; a concurrent writer would be a user error
        // we cannot guard against (the same contract as every mmap-based loader).
        let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.clone(), source })?;
        let header = read_header(&map).map_err(|message| ModelError::Safetensors { file: path.clone(), message })?;
        let idx = self.files.len();
        for h in header {
            let dtype = match h.dtype.as_str() {
                "BF16" => Ok(DType::BF16),
                "F16" => Ok(DType::F16),
                "F32" => Ok(DType::F32),
                "U8" => Ok(DType::U8),
                "F8_E4M3" => Ok(DType::F8E4M3),
                other => Err(other.to_string()),
            };
            self.entries.insert(h.name, Entry { file: idx, dtype, shape: h.shape, start: h.start });
        }
        self.files.push((path, Arc::new(Backing::Mapped(map))));
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The tensor `name`, or an error naming it.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let Some(e) = self.entries.get(name) else {
            return Err(ModelError::MissingTensor(name.to_string()));
        };
        let dtype = e.dtype.clone().map_err(|dtype| ModelError::UnsupportedDtype {
            tensor: name.to_string(),
            dtype,
            expected: "supported are BF16, F16, F32, and U8 / F8_E4M3 in quantized checkpoints",
        })?;
        let backing = self.files[e.file].1.clone();
        let tensor = Tensor { name: name.into(), dtype, shape: e.shape.clone(), backing, offset: e.start };
        if e.start % dtype.size_in_bytes() != 0 {
            // Safetensors does not align tensors to their element size; copy the rare odd one.
            return Ok(Tensor::owned(name, dtype, e.shape.clone(), tensor.bytes()));
        }
        Ok(tensor)
    }

    /// The tensor `name` if present.
    pub fn get_opt(&self, name: &str) -> Result<Option<Tensor>> {
        if self.contains(name) { self.get(name).map(Some) } else { Ok(None) }
    }

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> usize {
        self.files.iter().map(|(_, b)| b.bytes().len()).sum()
    }
}

/// One tensor of a safetensors header, checked against the file.
#[derive(Debug)]
struct HeaderEntry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    /// Byte offset of the tensor's data in the file.
    start: usize,
}

/// Bytes per element of the safetensors dtypes (all the format defines with whole bytes).
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" | "C64" => 8,
        _ => return None,
    })
}

/// Parses and checks the header of a safetensors file: the 8-byte header length, the JSON,
/// and every tensor's dtype, shape and `data_offsets` against the data section, which the
/// tensors must tile in offset order with neither gap nor overlap. The message names the
/// tensor that is wrong (after a gap: the tensor that follows it).
fn read_header(file: &[u8]) -> std::result::Result<Vec<HeaderEntry>, String> {
    let Some(len_bytes) = file.get(..8) else {
        return Err(format!("the file has {} bytes, fewer than the 8 of a header length", file.len()));
    };
    let n = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    let data_start = usize::try_from(n).ok().and_then(|n| n.checked_add(8)).filter(|&end| end <= file.len());
    let Some(data_start) = data_start else {
        return Err(format!("the header claims {n} bytes but the file has {} after the length", file.len() - 8));
    };
    let data_len = file.len() - data_start;
    let text = std::str::from_utf8(&file[8..data_start]).map_err(|e| format!("the header is not UTF-8: {e}"))?;
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the header is not valid JSON: {e}"))?;
    let map = json.as_object().ok_or("the header is not a JSON object")?;
    let mut entries = Vec::with_capacity(map.len());
    // Per tensor: its data's byte range in the data section.
    let mut spans: Vec<(usize, usize, usize)> = Vec::with_capacity(map.len());
    for (name, info) in map.iter().filter(|(k, _)| *k != "__metadata__") {
        let bad = |what: &str| format!("tensor `{name}`: {what}");
        let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no `dtype` string"))?;
        let size = dtype_size(dtype).ok_or_else(|| bad(&format!("unknown dtype `{dtype}`")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect())
            .ok_or_else(|| bad("`shape` is not a list of non-negative integers"))?;
        let offsets = info.get("data_offsets").and_then(|o| o.as_array()).map(Vec::as_slice);
        let (begin, end) = match offsets.map(|o| o.iter().map(|v| v.as_u64()).collect::<Vec<_>>()).as_deref() {
            Some(&[Some(b), Some(e)]) => (b, e),
            _ => return Err(bad("`data_offsets` is not two non-negative integers")),
        };
        if begin > end || end > data_len as u64 {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] do not lie in the data section of {data_len} bytes"
            )));
        }
        let (begin, end) = (begin as usize, end as usize);
        let bytes = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
        if bytes != Some(end - begin) {
            let needed = bytes.map_or_else(|| "more than fit in memory".to_string(), |b| format!("{b} bytes"));
            return Err(bad(&format!(
                "{dtype} of shape {shape:?} needs {needed} but data_offsets [{begin}, {end}] hold {}",
                end - begin
            )));
        }
        spans.push((begin, end, entries.len()));
        entries.push(HeaderEntry { name: name.clone(), dtype: dtype.to_string(), shape, start: data_start + begin });
    }
    spans.sort_unstable();
    let mut covered = 0;
    let mut previous: Option<&str> = None;
    for &(begin, end, i) in &spans {
        let name = &entries[i].name;
        if begin > covered {
            let after = previous.map_or_else(|| "the start of the data".to_string(), |p| format!("tensor `{p}`"));
            return Err(format!(
                "tensor `{name}`: data_offsets start at {begin}, leaving {} unused bytes after {after}",
                begin - covered
            ));
        }
        if begin < covered {
            let p = previous.expect("only a tensor after another starts before the covered end");
            return Err(format!("tensor `{name}`: data_offsets [{begin}, {end}] overlap tensor `{p}`'s data"));
        }
        covered = end;
        previous = Some(name);
    }
    if covered != data_len {
        let after = previous.map_or_else(|| "the header".to_string(), |p| format!("the last tensor `{p}`"));
        return Err(format!("{} unused bytes after {after} at the end of the data section", data_len - covered));
    }
    Ok(entries)
}

/// Writes tensors as one safetensors file (random checkpoints for benchmarks and tests).
pub fn write_safetensors(path: &Path, tensors: &[Tensor]) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let dtype = match t.dtype {
                DType::F32 => StDtype::F32,
                DType::F16 => StDtype::F16,
                DType::BF16 => StDtype::BF16,
                DType::U8 => StDtype::U8,
                DType::F8E4M3 => StDtype::F8_E4M3,
            };
            let view =
                safetensors::tensor::TensorView::new(dtype, t.shape.clone(), t.bytes()).expect("consistent tensor");
            (t.name.to_string(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| ModelError::Safetensors { file: path.to_path_buf(), message: e.to_string() })
}
