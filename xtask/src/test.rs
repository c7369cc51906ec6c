//! `cargo xtask test`: setup and build, then the container images (`cargo xtask image`
//! for every architecture; the integration tests find the image's name in
//! `WEFT_IMAGE`), the unit tests, the root integration tests
//! (weft-testbed, one at a time since they share the host's network namespaces,
//! interfaces and bpffs), the kernel-dependent ones again in a QEMU guest with Debian
//! 12's 6.1 kernel (`cargo xtask vm-test`'s default list), then in an arm64 guest
//! (`cargo xtask vm-test --arch arm64`'s default list), a short run of every fuzz
//! target, and the lints. Every stage runs even when an earlier one
//! failed, so one CI run reports all failures; the exit status is nonzero if any did.

use anyhow::{Result, bail};

use crate::{
    arch::Arch,
    build, exec, image, lint,
    workspace::{EBPF_PACKAGE, TESTBED_PACKAGE, Workspace, is_root},
};

/// Runs all stages and prints one summary line per stage.
pub fn run(ws: &Workspace) -> Result<()> {
    let agent = build::run(ws, &build::Args::default())?;
    let variant = build::build_ebpf_variant(ws)?;
    let mut stages: Vec<(&str, Result<()>)> = Vec::new();

    // Podman's and buildah's storage need root.
    let image = if is_root() {
        image::build_all(ws, &Arch::ALL)
    } else {
        Err(anyhow::anyhow!(
            "not run: building and running images needs root (podman's storage)"
        ))
    };
    let image = match image {
        Ok(name) => {
            stages.push(("images (x86_64, arm64)", Ok(())));
            Some(name)
        }
        Err(err) => {
            stages.push(("images (x86_64, arm64)", Err(err)));
            None
        }
    };
    let cargo_test = || {
        let mut cmd = ws.cargo();
        cmd.arg("test")
            .env("WEFT_EBPF_OBJECT", ws.ebpf_object())
            .env("WEFT_EBPF_VARIANT_OBJECT", &variant)
            .env("WEFT_AGENT_BIN", &agent);
        if let Some(image) = &image {
            cmd.env(image::IMAGE_ENV, image);
        }
        if let Some(validator) = crate::setup::kubernetes_validate_bin(ws) {
            cmd.env("WEFT_KUBERNETES_VALIDATE", validator);
        }
        cmd
    };

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
    // Debian's arm64 kernel under TCG: the static aarch64 agent (built with the images)
    // and a short list of tests (`vm::DEFAULT_TESTS_ARM64`), about two minutes.
    let started = std::time::Instant::now();
    let arm64 = crate::vm::run(
        ws,
        &crate::vm::Args {
            arch: Arch::Aarch64,
            ..crate::vm::Args::default()
        },
    );
    eprintln!(
        "test: arm64 VM stage took {:.0}s",
        started.elapsed().as_secs_f64()
    );
    stages.push(("VM tests (arm64, kernel 6.1)", arm64));
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
