//! `cargo xtask lint`: rustfmt and clippy with `-D warnings` over the host crates and
//! the eBPF crate (the latter for `bpfel-unknown-none` with build-std, as it is built).

use anyhow::{Result, bail};

use crate::{
    build, exec, setup,
    workspace::{EBPF_PACKAGE, Workspace},
};

/// Runs every check, then fails if any failed (so one run reports all of them).
pub fn run(ws: &Workspace) -> Result<()> {
    setup::run(ws, setup::Mode::Quiet)?;
    // Clippy sees the agent as `cargo xtask build` builds it, with its programs.
    let object = build::build_ebpf(ws)?;
    let checks = [
        ("rustfmt", {
            let mut cmd = ws.cargo();
            cmd.args(["fmt", "--all", "--", "--check"]);
            cmd
        }),
        ("clippy (host crates)", {
            let mut cmd = ws.cargo();
            cmd.args([
                "clippy",
                "--workspace",
                "--exclude",
                EBPF_PACKAGE,
                "--all-targets",
                "--keep-going",
            ])
            .args(["--", "-D", "warnings"])
            .env("WEFT_EBPF_OBJECT", &object);
            cmd
        }),
        ("clippy (eBPF crate)", {
            let mut cmd = ws.cargo_ebpf("clippy")?;
            cmd.args(["--keep-going", "--", "-D", "warnings"]);
            cmd
        }),
    ];
    let mut failed = Vec::new();
    for (name, mut cmd) in checks {
        if let Err(err) = exec::run(&mut cmd) {
            eprintln!("lint: {name} FAILED: {err:#}");
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    eprintln!("lint: rustfmt and clippy clean");
    Ok(())
}
