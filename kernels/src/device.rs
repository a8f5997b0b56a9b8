//! Where compute runs.

use std::fmt;
use std::str::FromStr;

use crate::KernelError;

/// A compute device named on the command line (`cpu`, `cuda:0`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Checks that this build can run on the device.
    pub fn ensure_available(self) -> Result<Self, KernelError> {
        match self {
            Device::Cpu => Ok(self),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let count = crate::cuda::device_count()?;
                if n < count {
                    Ok(self)
                } else {
                    Err(KernelError::NoCuda(format!("{self} does not exist: this machine has {count} CUDA devices")))
                }
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(KernelError::NotCompiledWithCuda { device: self.to_string() }),
        }
    }
}

impl FromStr for Device {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| KernelError::UnknownDevice(s.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert!("tpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(Device::Cuda(0).ensure_available().is_err());
        assert!(Device::Cuda(4096).ensure_available().is_err());
    }
}
