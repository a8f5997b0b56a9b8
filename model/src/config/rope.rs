//! The rotary embedding as `config.json` describes it: its variant and base (transformers 4.x
//! `rope_theta` + `rope_scaling`, or 5.x `rope_parameters`) and how much of each head it
//! rotates.

use serde_json::Value;

use super::{Arch, Fields};
use crate::error::{ModelError, Result};

/// Rotary embedding variant.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f32,
    },
    /// Dynamic NTK: the base grows once a sequence passes `max_position_embeddings`.
    Dynamic {
        factor: f32,
    },
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: Option<f32>,
        mscale: Option<f32>,
        mscale_all_dim: Option<f32>,
        truncate: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    pub theta: f32,
    pub scaling: RopeScaling,
}

/// `max_position_embeddings` where a config leaves it out.
pub(super) fn default_max_positions(arch: Arch) -> usize {
    if arch == Arch::Glm4Moe { 131072 } else { 4096 }
}

/// How many of each head's `head_dim` values RoPE rotates: all, or GLM-4.5's
/// `partial_rotary_factor` of them (read as transformers does: from the RoPE parameters, else
/// the top level, else 0.5), truncated like Python's `int(head_dim * factor)`. Another
/// architecture's factor other than 1 is refused: nothing would honour it.
pub(super) fn rotary_dim(arch: Arch, f: &Fields<'_>, head_dim: usize) -> Result<usize> {
    let params = f.get("rope_scaling").or_else(|| f.get("rope_parameters")).and_then(Value::as_object).map(Fields);
    let factor = match params.as_ref().map(|p| p.opt_positive_f64("partial_rotary_factor")).transpose()?.flatten() {
        Some(factor) => Some(factor),
        None => f.opt_positive_f64("partial_rotary_factor")?,
    };
    if arch != Arch::Glm4Moe {
        return match factor {
            Some(factor) if factor != 1.0 => Err(ModelError::Config {
                field: "partial_rotary_factor",
                problem: format!("{factor} is not supported for {} (it rotates whole heads)", arch.model_type()),
            }),
            _ => Ok(head_dim),
        };
    }
    let factor = factor.unwrap_or(0.5);
    let dim = (head_dim as f64 * factor) as usize;
    if factor > 1.0 || dim == 0 || !dim.is_multiple_of(2) {
        return Err(ModelError::Config {
            field: "partial_rotary_factor",
            problem: format!(
                "must rotate an even number of at most head_dim ({head_dim}) values, got {factor} ({dim} values)"
            ),
        });
    }
    Ok(dim)
}

pub(super) fn rope_spec(arch: Arch, f: &Fields<'_>) -> Result<RopeSpec> {
    // 5.x: everything in `rope_parameters`; 4.x: `rope_theta` + optional `rope_scaling`.
    let params = f.get("rope_parameters").or_else(|| f.get("rope_scaling")).and_then(Value::as_object);
    let default_theta = match arch {
        Arch::Mixtral => 1e6,
        Arch::GptOss => 150000.0,
        _ => 10000.0,
    };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .map(|t| t as f32)
        .or(f.opt_f32("rope_theta")?)
        .unwrap_or(default_theta);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(ModelError::Config {
            field: "rope_theta",
            problem: format!("must be a finite number > 0, got {theta}"),
        });
    }
    let Some(p) = params else { return Ok(RopeSpec { theta, scaling: RopeScaling::None }) };
    let p = Fields(p);
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let factor = || -> Result<f32> {
        p.opt_positive_f32("factor")?
            .ok_or(ModelError::Config { field: "factor", problem: format!("is required for {kind} RoPE") })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "yarn" => {
            let original = p.opt_count("original_max_position_embeddings")?;
            let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(default_max_positions(arch));
            let original_max_position_embeddings = original.unwrap_or(max_pos);
            let factor = match p.opt_positive_f32("factor")? {
                Some(factor) => factor,
                None => max_pos as f32 / original_max_position_embeddings as f32,
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast: p.opt_finite_f32("beta_fast")?.unwrap_or(32.0),
                beta_slow: p.opt_finite_f32("beta_slow")?.unwrap_or(1.0),
                attention_factor: p.opt_positive_f32("attention_factor")?,
                mscale: p.opt_finite_f32("mscale")?,
                mscale_all_dim: p.opt_finite_f32("mscale_all_dim")?,
                truncate: p.bool_or("truncate", true)?,
            }
        }
        other => {
            return Err(ModelError::Config {
                field: "rope_type",
                problem: format!("`{other}` is not supported (default, linear, dynamic, yarn)"),
            });
        }
    };
    Ok(RopeSpec { theta, scaling })
}
