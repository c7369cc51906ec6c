//! `cargo xtask test`: setup and build, then the unit tests, the root integration tests
//! (weft-testbed, one at a time since they share the host's network namespaces,
//! interfaces and bpffs), the kernel-dependent ones again in a QEMU guest with Debian
//! 12's 6.1 kernel (`cargo xtask vm-test`'s default list), a short run of every fuzz
//! target, and the lints. Every stage runs even when an earlier one
//! failed, so one CI run reports all failures; the exit status is nonzero if any did.

use anyhow::{Result, bail};

use crate::{
    build, exec, lint,
    workspace::{EBPF_PACKAGE, TESTBED_PACKAGE, Workspace, is_root},
};

/// Runs all stages and prints one summary line per stage.
pub fn run(ws: &Workspace) -> Result<()> {
    let agent = build::run(ws, &build::Args { debug: false })?;
    let variant = build::build_ebpf_variant(ws)?;
    let cargo_test = || {
        let mut cmd = ws.cargo();
        cmd.arg("test")
            .env("WEFT_EBPF_OBJECT", ws.ebpf_object())
            .env("WEFT_EBPF_VARIANT_OBJECT", &variant)
            .env("WEFT_AGENT_BIN", &agent);
        if let Some(validator) = crate::setup::kubernetes_validate_bin(ws) {
            cmd.env("WEFT_KUBERNETES_VALIDATE", validator);
        }
        cmd
    };
    let mut stages: Vec<(&str, Result<()>)> = Vec::new();

    let mut unit = cargo_test();
    unit.args([
        "--workspace",
        "--exclude",
        EBPF_PACKAGE,
        "--exclude",
        TESTBED_PACKAGE,
    ]);
    stages.push(("unit tests", exec::run(&mut unit)));

    let integration = if is_root() {
        let mut cmd = cargo_test();
        cmd.args(["--package", TESTBED_PACKAGE, "--", "--test-threads=1"]);
        exec::run(&mut cmd)
    } else {
        Err(anyhow::anyhow!(
            "not run: the integration tests ({TESTBED_PACKAGE}) create network namespaces \
             and load eBPF programs, so they need root (run `sudo -E cargo xtask test`)"
        ))
    };
    stages.push(("integration tests", integration));
    stages.push((
        "VM tests (kernel 6.1)",
        crate::vm::run_built(ws, &agent, &variant, &crate::vm::Args::default()),
    ));
    stages.push(("bench smoke run", crate::bench::smoke(ws, &agent)));
    stages.push(("fuzz smoke run", crate::fuzz::smoke(ws)));

    stages.push(("lint", lint::run(ws)));

    eprintln!();
    let mut failed = Vec::new();
    for (name, result) in &stages {
        match result {
            Ok(()) => eprintln!("test: {name}: ok"),
            Err(err) => {
                eprintln!("test: {name}: FAILED: {err:#}");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
