//! Points the agent at the eBPF object it embeds. `cargo xtask build` compiles the
//! eBPF crate first and passes its path in `WEFT_EBPF_OBJECT`.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=WEFT_EBPF_OBJECT");
    let path = match env::var_os("WEFT_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
            root.join("../target/bpfel-unknown-none/release/weft")
        }
    };
    if !path.exists() {
        panic!(
            "eBPF object {} not found: build through `cargo xtask build` (or `cargo xtask test`), \
             which compiles the eBPF crate first",
            path.display()
        );
    }
    println!("cargo:rerun-if-changed={}", path.display());
    println!("cargo:rustc-env=WEFT_EBPF_OBJECT={}", path.display());
}
