//! `cargo xtask build`: the eBPF object first (release, `bpfel-unknown-none`, with BTF),
//! then the agent, which embeds it through `WEFT_EBPF_OBJECT`. With `--target`, a
//! statically linked (musl) release agent for x86_64 or aarch64 instead, embedding an
//! eBPF object built for that architecture ([`build_static`]).

use std::{fs, path::PathBuf};

use anyhow::{Context, Result, bail};

use crate::{
    arch::Arch,
    exec, setup,
    workspace::{AGENT_PACKAGE, Profile, Workspace, find_binary},
};

/// Command line of `cargo xtask build`: [`Args`] plus the static targets.
#[derive(Debug, clap::Args)]
pub struct Cli {
    #[command(flatten)]
    args: Args,
    /// Build a statically linked release agent for this musl target instead of the
    /// host's agent: `x86_64-unknown-linux-musl` or `aarch64-unknown-linux-musl`
    /// (repeatable). Output: `target/<TRIPLE>/release/weft`, stripped.
    #[arg(long = "target", value_name = "TRIPLE", value_parser = parse_triple)]
    targets: Vec<Arch>,
}

fn parse_triple(text: &str) -> Result<Arch> {
    Arch::from_triple(text)
}

/// `cargo xtask build`: the host agent, or the static agents of `--target`.
pub fn run_cli(ws: &Workspace, cli: &Cli) -> Result<()> {
    if cli.targets.is_empty() {
        return run(ws, &cli.args).map(drop);
    }
    if cli.args.debug {
        bail!("--debug and --target do not go together: static builds are release builds");
    }
    setup::run(ws, setup::Mode::Quiet)?;
    for &arch in &cli.targets {
        build_static(ws, arch, cli.args.no_kubernetes)?;
    }
    Ok(())
}

/// Options of `cargo xtask build`.
#[derive(Debug, Default, clap::Args)]
pub struct Args {
    /// Build the agent with the dev profile (the eBPF object is always release).
    #[arg(long)]
    pub debug: bool,
    /// Leave out the Kubernetes API client (cargo feature `kubernetes`, about half of
    /// the binary): for nodes that take their peers from the command line or
    /// `KUBE_PEERS` only (`--kube-peers` is then refused).
    #[arg(long)]
    pub no_kubernetes: bool,
}

/// Adds the cargo feature flags of a build with or without the Kubernetes client.
fn features(cmd: &mut std::process::Command, no_kubernetes: bool) {
    if no_kubernetes {
        cmd.args(["--no-default-features", "--features", "agent"]);
    }
}

/// Runs setup, builds both halves and reports the agent's size. Returns the agent path.
pub fn run(ws: &Workspace, args: &Args) -> Result<PathBuf> {
    setup::run(ws, setup::Mode::Quiet)?;
    build_ebpf(ws)?;
    let profile = if args.debug {
        Profile::Debug
    } else {
        Profile::Release
    };
    build_agent(ws, profile, args.no_kubernetes)
}

/// Builds the eBPF crate with bpf-linker from `.tools`; returns the object's path.
pub fn build_ebpf(ws: &Workspace) -> Result<PathBuf> {
    exec::run(&mut ws.cargo_ebpf("build")?)?;
    let object = ws.ebpf_object();
    let size = file_size(&object)?;
    eprintln!("build: eBPF object {} ({size} bytes)", object.display());
    Ok(object)
}

/// Builds the eBPF crate for programs that run on an `arch` kernel; returns the object
/// ([`Workspace::ebpf_object_for`]).
pub fn build_ebpf_for(ws: &Workspace, arch: Arch) -> Result<PathBuf> {
    exec::run(&mut ws.cargo_ebpf_for(arch, "build")?)?;
    let object = ws.ebpf_object_for(arch)?;
    let size = file_size(&object)?;
    eprintln!(
        "build: {arch} eBPF object {} ({size} bytes)",
        object.display()
    );
    Ok(object)
}

/// Builds the statically linked release agent of `arch` (musl; symbols stripped, as
/// it ships in the image) embedding the eBPF object built for `arch`, after adding the
/// target's standard library if it is missing. Checks that the result is an ELF
/// executable for `arch` without a program interpreter; returns its path
/// ([`Workspace::static_agent_bin`]). Does not run setup's other steps (bpf-linker):
/// callers run `setup::run` first.
pub fn build_static(ws: &Workspace, arch: Arch, no_kubernetes: bool) -> Result<PathBuf> {
    setup::rust_target(ws, arch.musl_triple())?;
    setup::static_build_tools()?;
    let object = build_ebpf_for(ws, arch)?;
    let mut cmd = ws.cargo();
    cmd.args(["build", "--package", AGENT_PACKAGE, "--release"])
        .args(["--target", arch.musl_triple()])
        .env("WEFT_EBPF_OBJECT", &object)
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    features(&mut cmd, no_kubernetes);
    static_link_env(&mut cmd, arch);
    exec::run(&mut cmd)?;
    let agent = ws.static_agent_bin(arch);
    check_static_elf(&agent, arch)?;
    eprintln!(
        "build: static {arch} agent {} ({}, stripped)",
        agent.display(),
        human(file_size(&agent)?)
    );
    Ok(agent)
}

/// The environment a cargo build for `arch`'s musl target needs: aarch64 links with
/// the toolchain's own `rust-lld`, so no cross C toolchain is needed (x86_64-musl links
/// with the host's `cc` and Rust's self-contained musl objects). The C in `ring`
/// (TLS of the Kubernetes client) is compiled by gcc for x86_64 (the `cc` crate
/// would look for a `musl-gcc`) and by clang for aarch64.
pub fn static_link_env(cmd: &mut std::process::Command, arch: Arch) {
    match arch {
        Arch::X86_64 => {
            cmd.env("CC_x86_64_unknown_linux_musl", "gcc");
        }
        Arch::Aarch64 => {
            cmd.env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER", "rust-lld")
                .env("CC_aarch64_unknown_linux_musl", "clang");
        }
    }
}

/// Fails unless `path` is a 64-bit little-endian ELF executable for `arch` with no
/// `PT_INTERP` (no dynamic loader: statically linked).
pub fn check_static_elf(path: &std::path::Path, arch: Arch) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let problem = elf_static_problem(&bytes, arch);
    match problem {
        None => Ok(()),
        Some(problem) => bail!("{}: {problem}", path.display()),
    }
}

/// Why `elf` is not a static executable for `arch`, or `None` if it is one.
fn elf_static_problem(elf: &[u8], arch: Arch) -> Option<String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Some("not a 64-bit little-endian ELF file".to_owned());
    }
    let want_machine = match arch {
        Arch::X86_64 => 62,
        Arch::Aarch64 => 183,
    };
    let Some(machine) = u16_at(18) else {
        return Some("truncated ELF header".to_owned());
    };
    if machine != want_machine {
        return Some(format!(
            "ELF machine {machine}, expected {want_machine} ({arch})"
        ));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return Some("truncated ELF header".to_owned());
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return Some("program header offset out of range".to_owned());
    };
    for i in 0..usize::from(phnum) {
        let Some(p_type) = u32_at(phoff + i * usize::from(phentsize)) else {
            return Some("truncated program headers".to_owned());
        };
        if p_type == PT_INTERP {
            return Some("dynamically linked (it has a program interpreter)".to_owned());
        }
    }
    None
}

/// Builds the variant eBPF object (other code, same maps), which the tests load into
/// a running datapath to check that an upgrade swaps programs without loss.
pub fn build_ebpf_variant(ws: &Workspace) -> Result<PathBuf> {
    exec::run(&mut ws.cargo_ebpf_variant("build")?)?;
    let object = ws.ebpf_variant_object();
    let size = file_size(&object)?;
    eprintln!(
        "build: variant eBPF object {} ({size} bytes)",
        object.display()
    );
    Ok(object)
}

/// Builds the agent against the eBPF object [`build_ebpf`] produced; returns its path.
pub fn build_agent(ws: &Workspace, profile: Profile, no_kubernetes: bool) -> Result<PathBuf> {
    let mut cmd = ws.cargo();
    cmd.args(["build", "--package", AGENT_PACKAGE])
        .env("WEFT_EBPF_OBJECT", ws.ebpf_object());
    features(&mut cmd, no_kubernetes);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    exec::run(&mut cmd)?;
    let agent = ws.agent_bin(profile);
    let size = file_size(&agent)?;
    eprintln!("build: agent {} ({})", agent.display(), human(size));
    report_stripped_size(&agent)?;
    Ok(agent)
}

/// Writes `<agent>.stripped` (all symbols removed, as a distribution would ship it) and
/// prints its size. Skipped with a note when `strip` is not installed.
fn report_stripped_size(agent: &std::path::Path) -> Result<()> {
    let Some(strip) = find_binary("strip") else {
        eprintln!("build: `strip` not found (binutils); no stripped size");
        return Ok(());
    };
    let mut stripped = agent.as_os_str().to_owned();
    stripped.push(".stripped");
    let stripped = PathBuf::from(stripped);
    exec::run(
        std::process::Command::new(strip)
            .arg("--strip-all")
            .arg("-o")
            .arg(&stripped)
            .arg(agent),
    )?;
    let size = file_size(&stripped)?;
    eprintln!(
        "build: stripped copy {} ({})",
        stripped.display(),
        human(size)
    );
    Ok(())
}

fn file_size(path: &std::path::Path) -> Result<u64> {
    let meta =
        fs::metadata(path).with_context(|| format!("build produced no {}", path.display()))?;
    if meta.len() == 0 {
        bail!("{} is empty", path.display());
    }
    Ok(meta.len())
}

/// `12345678` -> `12345678 bytes, 11.8 MiB`.
pub fn human(bytes: u64) -> String {
    // Display only; precision loss above 2^52 bytes does not matter.
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let mib = bytes as f64 / (1024.0 * 1024.0);
    format!("{bytes} bytes, {mib:.1} MiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header for `machine` with the program header types `types`.
    fn elf(machine: u16, types: &[u32]) -> Vec<u8> {
        let mut e = vec![0u8; 64];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[18..20].copy_from_slice(&machine.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&u16::try_from(types.len()).unwrap().to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            e.extend(ph);
        }
        e
    }

    #[test]
    fn static_elf_check() {
        assert_eq!(
            elf_static_problem(&elf(183, &[6, 1, 1]), Arch::Aarch64),
            None
        );
        assert_eq!(elf_static_problem(&elf(62, &[1, 2]), Arch::X86_64), None);
        let dynamic = elf_static_problem(&elf(62, &[6, 3, 1]), Arch::X86_64).unwrap();
        assert!(dynamic.contains("dynamically linked"), "{dynamic}");
        let wrong = elf_static_problem(&elf(62, &[1]), Arch::Aarch64).unwrap();
        assert!(wrong.contains("expected 183"), "{wrong}");
        assert!(elf_static_problem(b"#!/bin/sh\n", Arch::X86_64).is_some());
        let mut cut = elf(62, &[1, 1]);
        cut.truncate(100);
        assert!(elf_static_problem(&cut, Arch::X86_64).is_some());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(3 * 1024 * 1024), "3145728 bytes, 3.0 MiB");
    }
}
