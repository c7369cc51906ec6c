//! Where things are: the repository, cargo's target directory, the project-local tools,
//! and the build outputs; plus the few facts about the host that tasks branch on.

use std::{
    env, fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::arch::Arch;

/// The eBPF target triple.
pub const BPF_TARGET: &str = "bpfel-unknown-none";
/// Package name of the eBPF crate.
pub const EBPF_PACKAGE: &str = "weft-ebpf";
/// Package name of the agent.
pub const AGENT_PACKAGE: &str = "weft";
/// Package name of the root integration tests and testbed.
pub const TESTBED_PACKAGE: &str = "weft-testbed";

/// Paths of the checkout xtask works on.
#[derive(Debug)]
pub struct Workspace {
    /// Repository root (holds the workspace `Cargo.toml` and `rust-toolchain.toml`).
    pub root: PathBuf,
    /// Cargo's target directory: `$CARGO_TARGET_DIR` when set, else `<root>/target`.
    pub target_dir: PathBuf,
}

impl Workspace {
    /// Finds the workspace from xtask's own manifest directory.
    pub fn locate() -> Result<Self> {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        if !root.join("rust-toolchain.toml").is_file() {
            bail!("{} is not the weft workspace root", root.display());
        }
        let target_dir = match env::var_os("CARGO_TARGET_DIR") {
            // Cargo resolves a relative CARGO_TARGET_DIR against its working directory,
            // and the commands xtask runs use the repository root as theirs.
            Some(dir) if !dir.is_empty() => env::current_dir()
                .context("no current directory")?
                .join(dir),
            _ => root.join("target"),
        };
        Ok(Self { root, target_dir })
    }

    /// Project-local tools (bpf-linker and the LLVM links it needs); gitignored.
    pub fn tools_dir(&self) -> PathBuf {
        self.root.join(".tools")
    }

    /// The eBPF object `cargo xtask build` produces and the agent embeds.
    pub fn ebpf_object(&self) -> PathBuf {
        self.target_dir
            .join(BPF_TARGET)
            .join("release")
            .join("weft")
    }

    /// The eBPF object for programs that run on an `arch` kernel: the host's is
    /// [`Workspace::ebpf_object`]; another architecture's is built into a target
    /// directory of its own (`target/ebpf-<arch>/`), so the two never mix.
    pub fn ebpf_object_for(&self, arch: Arch) -> Result<PathBuf> {
        if arch == Arch::host()? {
            return Ok(self.ebpf_object());
        }
        Ok(self
            .ebpf_arch_target_dir(arch)
            .join(BPF_TARGET)
            .join("release")
            .join("weft"))
    }

    fn ebpf_arch_target_dir(&self, arch: Arch) -> PathBuf {
        self.target_dir.join(format!("ebpf-{arch}"))
    }

    /// The static (musl) release agent of `arch`.
    pub fn static_agent_bin(&self, arch: Arch) -> PathBuf {
        self.target_dir
            .join(arch.musl_triple())
            .join("release")
            .join("weft")
    }

    /// The agent binary of a profile.
    pub fn agent_bin(&self, profile: Profile) -> PathBuf {
        self.target_dir.join(profile.dir()).join("weft")
    }

    /// A command run from the repository root, so rustup picks the pinned toolchain.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root);
        if let Some(dir) = env::var_os("CARGO_TARGET_DIR")
            && Path::new(&dir).is_relative()
        {
            cmd.env("CARGO_TARGET_DIR", &self.target_dir);
        }
        cmd
    }

    /// `cargo` run from the repository root.
    pub fn cargo(&self) -> Command {
        self.command("cargo")
    }

    /// `cargo <subcommand> -p weft-ebpf --release --target bpfel-unknown-none
    /// -Z build-std=core` with the rustflags and PATH the eBPF build needs.
    pub fn cargo_ebpf(&self, subcommand: &str) -> Result<Command> {
        let mut cmd = self.cargo();
        cmd.args([subcommand, "--package", EBPF_PACKAGE, "--release"])
            .args(["--target", BPF_TARGET, "-Z", "build-std=core"])
            .env("PATH", self.path_with_tools()?)
            .env("CARGO_ENCODED_RUSTFLAGS", bpf_rustflags()?);
        Ok(cmd)
    }

    /// [`Workspace::cargo_ebpf`] for programs that run on an `arch` kernel
    /// (`bpf_target_arch`), writing [`Workspace::ebpf_object_for`].
    pub fn cargo_ebpf_for(&self, arch: Arch, subcommand: &str) -> Result<Command> {
        let mut cmd = self.cargo_ebpf(subcommand)?;
        if arch != Arch::host()? {
            cmd.env("CARGO_TARGET_DIR", self.ebpf_arch_target_dir(arch))
                .env("CARGO_ENCODED_RUSTFLAGS", bpf_rustflags_for(arch));
        }
        Ok(cmd)
    }

    /// [`Workspace::cargo_ebpf`] for the variant object (`--cfg weft_variant`), in a
    /// target directory of its own so the two builds never invalidate each other.
    pub fn cargo_ebpf_variant(&self, subcommand: &str) -> Result<Command> {
        let mut cmd = self.cargo_ebpf(subcommand)?;
        cmd.env("CARGO_TARGET_DIR", self.variant_target_dir()).env(
            "CARGO_ENCODED_RUSTFLAGS",
            bpf_rustflags()? + "\x1f--cfg=weft_variant",
        );
        Ok(cmd)
    }

    fn variant_target_dir(&self) -> PathBuf {
        self.target_dir.join("ebpf-variant")
    }

    /// The variant eBPF object (see [`Workspace::cargo_ebpf_variant`]).
    pub fn ebpf_variant_object(&self) -> PathBuf {
        self.variant_target_dir()
            .join(BPF_TARGET)
            .join("release")
            .join("weft")
    }

    /// `$PATH` with `.tools/bin` (bpf-linker) in front.
    fn path_with_tools(&self) -> Result<std::ffi::OsString> {
        let old = env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(self.tools_dir().join("bin")).chain(env::split_paths(&old));
        env::join_paths(dirs).context("PATH holds a directory with ':' in its name")
    }
}

/// Cargo profile of the agent build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `dev` (target/debug).
    Debug,
    /// `release` (target/release).
    Release,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }
}

/// `CARGO_ENCODED_RUSTFLAGS` for the eBPF crate: aya-ebpf's `bpf_target_arch` cfg for
/// the host (the kernel the programs run on), full debug info, and `--btf` so
/// bpf-linker emits BTF (without it the object has none).
pub fn bpf_rustflags() -> Result<String> {
    let arch = Arch::host().context("no eBPF build for this host")?;
    Ok(bpf_rustflags_for(arch))
}

/// [`bpf_rustflags`] for programs that run on an `arch` kernel.
pub fn bpf_rustflags_for(arch: Arch) -> String {
    [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f")
}

/// Whether xtask runs with effective uid 0.
pub fn is_root() -> bool {
    // /proc/self/status: "Uid:\t<real>\t<effective>\t<saved>\t<fs>".
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Finds an executable on `$PATH` or in the sbin directories (a non-root `$PATH` often
/// lacks them).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|file| {
            fs::metadata(file)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustflags_are_separated_by_unit_separator() {
        let flags = bpf_rustflags().unwrap();
        let parts: Vec<_> = flags.split('\x1f').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts[0].starts_with("--cfg=bpf_target_arch=\""));
        assert_eq!(parts[2], "-Clink-arg=--btf");
    }

    #[test]
    fn finds_sh_but_not_nonsense() {
        assert!(find_binary("sh").is_some());
        assert!(find_binary("no-such-binary-weft").is_none());
    }

    #[test]
    fn locates_the_workspace() {
        let ws = Workspace::locate().unwrap();
        assert!(ws.root.join("Cargo.toml").is_file());
        assert!(
            ws.ebpf_object()
                .ends_with("bpfel-unknown-none/release/weft")
        );
        let host = Arch::host().unwrap();
        assert_eq!(ws.ebpf_object_for(host).unwrap(), ws.ebpf_object());
        for arch in Arch::ALL.into_iter().filter(|&a| a != host) {
            let object = ws.ebpf_object_for(arch).unwrap();
            assert_ne!(object, ws.ebpf_object());
            assert!(object.starts_with(ws.target_dir.join(format!("ebpf-{arch}"))));
        }
    }
}
