//! The kernel sources in `kernels/cuda/`, built into the binary, and their compilation with
//! NVRTC for the device's architecture. `common.cuh` is prepended to every source, so the
//! sources need neither include paths nor CUDA headers at run time.

use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use crate::KernelError;

/// One `.cu` file and the kernels it defines.
pub struct Source {
    pub name: &'static str,
    pub code: &'static str,
    pub functions: &'static [&'static str],
}

const COMMON: &str = include_str!("../../cuda/common.cuh");

pub const SOURCES: &[Source] = &[
    Source {
        name: "matmul.cu",
        code: include_str!("../../cuda/matmul.cu"),
        functions: &[
            "linear_bf16",
            "linear_f16",
            "linear_f32",
            "grouped_linear_bf16",
            "grouped_linear_f16",
            "grouped_linear_f32",
            "linear_mxfp4",
            "linear_fp8",
            "grouped_linear_mxfp4",
            "grouped_linear_fp8",
            "round_to_bf16",
            "add_bias",
        ],
    },
    Source {
        name: "layers.cu",
        code: include_str!("../../cuda/layers.cu"),
        functions: &[
            "embed_bf16",
            "embed_f16",
            "embed_f32",
            "rms_norm",
            "rope",
            "clip",
            "add",
            "swiglu",
            "clamped_swiglu",
            "scale_rows_sigmoid",
            "gather_rows",
            "non_finite_rows",
            "greedy_pick",
            "read_sum",
        ],
    },
    Source { name: "moe.cu", code: include_str!("../../cuda/moe.cu"), functions: &["topk_gate", "combine_rows"] },
    Source {
        name: "attention.cu",
        code: include_str!("../../cuda/attention.cu"),
        functions: &["kv_write", "paged_attention"],
    },
];

/// Compiles `src` to PTX for compute capability `major.minor`. Needs only NVRTC (no device),
/// which is how the sources are checked on machines without a GPU.
pub fn compile(src: &Source, major: u32, minor: u32) -> Result<Ptx, KernelError> {
    super::probe_nvrtc()?;
    let code = format!("{COMMON}\n#line 1 \"{}\"\n{}", src.name, src.code);
    let opts = CompileOptions {
        name: Some(src.name.to_string()),
        options: vec![format!("--gpu-architecture=compute_{major}{minor}"), "--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(code, opts).map_err(|e| KernelError::KernelCompile { file: src.name, log: e.to_string() })
}
