//! `cargo xtask build`: the eBPF object first (release, `bpfel-unknown-none`, with BTF),
//! then the agent, which embeds it through `WEFT_EBPF_OBJECT`.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result, bail};

use crate::{
    exec, setup,
    workspace::{AGENT_PACKAGE, Profile, Workspace, find_binary},
};

/// Options of `cargo xtask build`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build the agent with the dev profile (the eBPF object is always release).
    #[arg(long)]
    pub debug: bool,
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
    build_agent(ws, profile)
}

/// Builds the eBPF crate with bpf-linker from `.tools`; returns the object's path.
pub fn build_ebpf(ws: &Workspace) -> Result<PathBuf> {
    exec::run(&mut ws.cargo_ebpf("build")?)?;
    let object = ws.ebpf_object();
    let size = file_size(&object)?;
    eprintln!("build: eBPF object {} ({size} bytes)", object.display());
    Ok(object)
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
pub fn build_agent(ws: &Workspace, profile: Profile) -> Result<PathBuf> {
    let mut cmd = ws.cargo();
    cmd.args(["build", "--package", AGENT_PACKAGE])
        .env("WEFT_EBPF_OBJECT", ws.ebpf_object());
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
fn human(bytes: u64) -> String {
    // Display only; precision loss above 2^52 bytes does not matter.
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let mib = bytes as f64 / (1024.0 * 1024.0);
    format!("{bytes} bytes, {mib:.1} MiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(3 * 1024 * 1024), "3145728 bytes, 3.0 MiB");
    }
}
