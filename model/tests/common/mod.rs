//! What the model tests share.

/// One test body per device: `$cpu` on the CPU, `$cuda` on `cuda:0` (ignored unless asked
/// for: it needs a GPU, so a machine without one reports it as skipped).
macro_rules! on_each_device {
    ($(#[$doc:meta])* $cpu:ident, $cuda:ident, |$device:ident| $body:block) => {
        $(#[$doc])*
        #[test]
        fn $cpu() -> Result<()> {
            let $device = Device::Cpu;
            $body
        }

        $(#[$doc])*
        #[test]
        #[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
        fn $cuda() -> Result<()> {
            let $device = Device::Cuda(0);
            $body
        }
    };
}
