//! Points the agent at the eBPF object it embeds: the one named by
//! `WEFT_EBPF_OBJECT` (`cargo xtask build` compiles the eBPF crate first and sets
//! it), else the one an earlier `cargo xtask build` left in `target/`.
//!
//! Without either, the agent is built without its programs (cfg `weft_no_ebpf`):
//! `cargo check`, `cargo test -p weft`, clippy and rust-analyzer then work on a fresh
//! clone, and `weft run` fails with a message saying how to build it properly. Only a
//! release build, the one that would be shipped, is refused.
//!
//! Why not build the eBPF crate from here (aya-build, as aya's template does)? It
//! needs bpf-linker on `PATH`, built against the pinned toolchain's LLVM, which
//! `cargo xtask setup` provides but plain cargo on a fresh clone does not have; every
//! check and clippy run would pay a nested `-Z build-std` build; and a build script
//! that fails for a missing tool is the very problem this avoids. xtask stays the
//! one place that knows how to build the eBPF object.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=WEFT_EBPF_OBJECT");
    println!("cargo::rustc-check-cfg=cfg(weft_no_ebpf)");
    if let Some(path) = env::var_os("WEFT_EBPF_OBJECT").map(PathBuf::from) {
        // Set on purpose, so a wrong path is an error rather than a silent fallback.
        assert!(
            path.is_file(),
            "WEFT_EBPF_OBJECT={} is not a file",
            path.display()
        );
        embed(&path);
        return;
    }
    let agent_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = agent_dir.parent().expect("the agent is a workspace member");
    let built = root.join("target/bpfel-unknown-none/release/weft");
    if built.is_file() {
        embed(&built);
        return;
    }
    // The fuzz targets (`cargo fuzz`, built with `--cfg fuzzing`) use the optimised
    // profile but only the library: they need no eBPF object.
    let fuzzing = env::var_os("CARGO_CFG_FUZZING").is_some();
    let release = env::var("PROFILE").is_ok_and(|p| p == "release") && !fuzzing;
    assert!(
        !release,
        "no eBPF object at {}: a release build must embed the eBPF programs; build with \
         `cargo xtask build`, which compiles them first",
        built.display()
    );
    println!("cargo::rustc-cfg=weft_no_ebpf");
    println!(
        "cargo::warning=building weft without its eBPF programs (fine for check, test and \
         clippy; `weft run` needs `cargo xtask build`)"
    );
}

/// Embeds the object at `path`, rebuilding when it changes.
fn embed(path: &std::path::Path) {
    println!("cargo::rerun-if-changed={}", path.display());
    println!("cargo::rustc-env=WEFT_EBPF_OBJECT={}", path.display());
}
