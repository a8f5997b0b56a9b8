//! The CUDA kernel sources compile with NVRTC and define every kernel the backend loads.
//! Needs only NVRTC, not a GPU: `scripts/test.sh` installs it from PyPI
//! (`nvidia-cuda-nvrtc`), points `LD_LIBRARY_PATH` at it and sets `SWITCHYARD_REQUIRE_NVRTC`
//! so it cannot be skipped there; elsewhere, without NVRTC, the test says so and passes.
#![cfg(feature = "cuda")]

use switchyard_kernels::cuda::{self, source};

#[test]
fn every_source_compiles_for_ampere_and_hopper() {
    if let Err(e) = cuda::probe_nvrtc() {
        assert!(std::env::var_os("SWITCHYARD_REQUIRE_NVRTC").is_none(), "SWITCHYARD_REQUIRE_NVRTC is set: {e}");
        println!("skipped: {e}");
        return;
    }
    for (major, minor) in [(8, 0), (9, 0)] {
        for src in source::SOURCES {
            let ptx = source::compile(src, major, minor).unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
            for f in src.functions {
                assert!(
                    text.contains(&format!(".entry {f}(")),
                    "{} compiled for sm_{major}{minor} lacks kernel `{f}`",
                    src.name
                );
            }
        }
    }
}
