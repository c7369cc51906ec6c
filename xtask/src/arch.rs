//! The CPU architectures weft ships static builds for, and the names each tool gives
//! them: the Rust musl target triple, aya-ebpf's `bpf_target_arch`, the OCI image
//! platform, and QEMU.

use std::{env, fmt};

use anyhow::{Result, bail};

/// An architecture of the static agent builds (`cargo xtask build --target`), the
/// image (`cargo xtask image --arch`) and the VM tests (`cargo xtask vm-test --arch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// x86_64 (OCI `amd64`).
    X86_64,
    /// 64-bit ARM (OCI `arm64`).
    Aarch64,
}

impl Arch {
    /// Every architecture, in the order tasks build them.
    pub const ALL: [Self; 2] = [Self::X86_64, Self::Aarch64];

    /// The architecture xtask runs on, if it is one of [`Arch::ALL`].
    pub fn host() -> Result<Self> {
        match env::consts::ARCH {
            "x86_64" => Ok(Self::X86_64),
            "aarch64" => Ok(Self::Aarch64),
            other => bail!("unsupported host architecture {other}"),
        }
    }

    /// The kernel's and Rust's name: `x86_64`, `aarch64` (aya-ebpf's
    /// `bpf_target_arch` takes it too).
    pub fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// The statically linked Rust target: `<arch>-unknown-linux-musl`.
    pub fn musl_triple(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-unknown-linux-musl",
            Self::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// The OCI (and Debian) name: `amd64`, `arm64`.
    pub fn oci(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    /// Parses a musl triple (`cargo xtask build --target`).
    pub fn from_triple(text: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|arch| arch.musl_triple() == text)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unsupported target `{text}`: static builds exist for {}",
                    Self::ALL.map(Self::musl_triple).join(" and ")
                )
            })
    }

    /// Parses any of the names (`x86_64`, `amd64`, `aarch64`, `arm64`).
    pub fn from_name(text: &str) -> Result<Self> {
        match text {
            "x86_64" | "amd64" => Ok(Self::X86_64),
            "aarch64" | "arm64" => Ok(Self::Aarch64),
            other => {
                bail!("unknown architecture `{other}`: expected x86_64 (amd64) or arm64 (aarch64)")
            }
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for arch in Arch::ALL {
            assert_eq!(Arch::from_triple(arch.musl_triple()).unwrap(), arch);
            assert_eq!(Arch::from_name(arch.name()).unwrap(), arch);
            assert_eq!(Arch::from_name(arch.oci()).unwrap(), arch);
        }
    }

    #[test]
    fn unknown_names_are_refused() {
        let e = Arch::from_triple("aarch64-unknown-linux-gnu").unwrap_err();
        assert!(e.to_string().contains("x86_64-unknown-linux-musl"), "{e}");
        assert!(Arch::from_name("riscv64").is_err());
    }
}
