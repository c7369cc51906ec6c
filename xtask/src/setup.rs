//! `cargo xtask setup`: make sure everything the other tasks need is present, installing
//! what is missing. Idempotent, and fast (well under a second) when nothing is missing;
//! `build`, `test`, `demo` and `lint` run it first.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{
    arch::Arch,
    exec,
    workspace::{Workspace, find_binary, is_root},
};

/// The bpf-linker release built into `.tools`.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The cargo-fuzz release installed into `.tools/cargo-fuzz` (for `cargo xtask fuzz`
/// and the fuzz smoke run of `cargo xtask test`).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Binaries the tests, the demo and the bench use, with the Debian package providing
/// each. `cargo xtask vm-test` also copies them (all but `strip`) into its guest.
pub const DEBIAN_TOOLS: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("tcpdump", "tcpdump"),
    ("bpftool", "bpftool"),
    ("ping", "iputils-ping"),
    ("ip", "iproute2"),
    ("bridge", "iproute2"),
    ("sysctl", "procps"),
    ("tc", "iproute2"),
    ("strip", "binutils"),
    ("setpriv", "util-linux"),
    ("nsenter", "util-linux"),
    ("ethtool", "ethtool"),
    ("nft", "nftables"),
    // The DaemonSet test runs the manifest's pod with podman (runc as its runtime).
    ("podman", "podman"),
    ("runc", "runc"),
];

/// What `cargo xtask vm-test` needs on top of [`DEBIAN_TOOLS`], installed only when it
/// runs (see [`vm_tools`]): QEMU (the guest architecture's, added by [`vm_tools`]), a
/// static busybox for the guest, `cpio` for the initramfs and `depmod` for its modules.
pub const VM_TOOLS: &[(&str, &str)] = &[
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("depmod", "kmod"),
    ("objcopy", "binutils"),
];

/// What the CNI tests need on top of [`DEBIAN_TOOLS`] (kept apart: `vm-test` copies
/// [`DEBIAN_TOOLS`] into its guest): iptables for network policy, and a real
/// container runtime calling the plugin (podman with runc, buildah to build a
/// `FROM scratch` image holding a static busybox).
pub const CNI_TOOLS: &[(&str, &str)] = &[
    ("iptables", "iptables"),
    ("podman", "podman"),
    ("buildah", "buildah"),
    ("runc", "runc"),
    ("busybox", "busybox-static"),
];

/// What `cargo xtask image` needs, installed only when it runs (see [`image_tools`]):
/// buildah to build, podman (with runc) to run and inspect.
pub const IMAGE_TOOLS: &[(&str, &str)] = &[
    ("buildah", "buildah"),
    ("podman", "podman"),
    ("runc", "runc"),
];

/// What a static (musl) build needs besides the Rust target: a C compiler for the
/// C and assembly in `ring` (the Kubernetes client's TLS). x86_64 uses the host's
/// gcc; for aarch64 clang cross-compiles (`--target`), since Debian's cross gcc
/// would use the host's glibc headers.
pub const STATIC_BUILD_TOOLS: &[(&str, &str)] = &[("gcc", "gcc"), ("clang", "clang")];

/// How much setup reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `cargo xtask setup`: one line per item.
    Verbose,
    /// Before another task: only what it changes or cannot do.
    Quiet,
}

/// Runs every setup step.
pub fn run(ws: &Workspace, mode: Mode) -> Result<()> {
    let say = |msg: String| {
        if mode == Mode::Verbose {
            eprintln!("setup: {msg}");
        }
    };
    toolchain(ws, &say)?;
    bpf_linker(ws, &say)?;
    cargo_fuzz(ws, &say)?;
    debian_tools(DEBIAN_TOOLS, "test tools", &say)?;
    debian_tools(CNI_TOOLS, "CNI test tools", &say)?;
    bpffs(&say)?;
    if let Err(e) = kubernetes_validate(ws, &say) {
        // Not fatal: the manifest test says SKIPPED without it.
        eprintln!("setup: kubernetes-validate not installed: {e:#}");
    }
    Ok(())
}

/// The kubernetes-validate release (PyPI) the manifest test runs.
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// `kubernetes-validate`, which checks the manifest against the API's schemas: the
/// one on PATH, else the one in `.tools/kubernetes-validate` (a Python virtual
/// environment, installed from PyPI when absent; Debian's python3-venv is
/// apt-installed for it if missing).
pub fn kubernetes_validate_bin(ws: &Workspace) -> Option<PathBuf> {
    find_binary("kubernetes-validate").or_else(|| {
        let venv = ws
            .tools_dir()
            .join("kubernetes-validate/bin/kubernetes-validate");
        venv.is_file().then_some(venv)
    })
}

fn kubernetes_validate(ws: &Workspace, say: &dyn Fn(String)) -> Result<()> {
    if let Some(bin) = kubernetes_validate_bin(ws) {
        say(format!("kubernetes-validate ok ({})", bin.display()));
        return Ok(());
    }
    let venv_ok = || {
        Command::new("python3")
            .args(["-m", "venv", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !venv_ok() {
        debian_tools(&[("python3", "python3-venv")], "Python", say)?;
        if !venv_ok() && is_root() && find_binary("apt-get").is_some() {
            // python3 without its venv module.
            exec::run(
                Command::new("apt-get")
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdin(Stdio::null())
                    .args([
                        "-q",
                        "install",
                        "-y",
                        "--no-install-recommends",
                        "python3-venv",
                    ]),
            )?;
        }
    }
    let dir = ws.tools_dir().join("kubernetes-validate");
    eprintln!(
        "setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} from PyPI into {}",
        dir.display()
    );
    let installed =
        exec::run(Command::new("python3").args(["-m", "venv"]).arg(&dir)).and_then(|()| {
            exec::run(
                Command::new(dir.join("bin/pip"))
                    .args(["install", "-q", "--disable-pip-version-check"])
                    .arg(format!(
                        "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
                    )),
            )
        });
    if let Err(e) = installed {
        let _ = fs::remove_dir_all(&dir);
        return Err(e.context("is PyPI reachable?"));
    }
    Ok(())
}

/// Installs the Debian packages of [`VM_TOOLS`] and QEMU for an `arch` guest that are
/// missing. Unlike [`run`], a tool that cannot be installed (not root, no apt-get,
/// apt-get failed) is an error: the VM stage cannot run without it.
pub fn vm_tools(arch: Arch) -> Result<()> {
    let mut tools = VM_TOOLS.to_vec();
    tools.push(match arch {
        Arch::X86_64 => ("qemu-system-x86_64", "qemu-system-x86"),
        Arch::Aarch64 => ("qemu-system-aarch64", "qemu-system-arm"),
    });
    require_tools(&tools, "VM tools", "the VM tests need")
}

/// Installs the missing Debian packages of `tools` (`what` names them in setup's
/// messages); an error, starting with `purpose`, if one still cannot be found.
fn require_tools(tools: &[(&str, &str)], what: &str, purpose: &str) -> Result<()> {
    debian_tools(tools, what, &|_| ())?;
    let missing = missing_binaries(tools);
    if !missing.is_empty() {
        bail!(
            "{purpose} {} (Debian: apt-get install {}); not installed",
            missing.join(", "),
            packages_of(tools).join(" ")
        );
    }
    Ok(())
}

/// Makes dpkg and apt know `arch`'s packages when it is not the host's (`dpkg
/// --add-architecture`, then `apt-get update`), so that `apt-get download` fetches
/// them (the arm64 guest's kernel and programs). Needs root.
pub fn foreign_architecture(arch: Arch) -> Result<()> {
    let native = exec::output(Command::new("dpkg").arg("--print-architecture"))?;
    if native.trim() == arch.oci() {
        return Ok(());
    }
    let foreign = exec::output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if foreign.lines().any(|line| line.trim() == arch.oci()) {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "dpkg does not know the {} architecture and adding it needs root \
             (`dpkg --add-architecture {0} && apt-get update`)",
            arch.oci()
        );
    }
    exec::run(Command::new("dpkg").args(["--add-architecture", arch.oci()]))?;
    exec::run(
        Command::new("apt-get")
            .args(["-q", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
}

/// Installs the Debian packages of [`IMAGE_TOOLS`] that are missing; like
/// [`vm_tools`], a tool that cannot be installed is an error.
pub fn image_tools() -> Result<()> {
    require_tools(IMAGE_TOOLS, "image tools", "building the image needs")
}

/// Installs [`STATIC_BUILD_TOOLS`] that are missing; an error if one cannot be.
pub fn static_build_tools() -> Result<()> {
    require_tools(
        STATIC_BUILD_TOOLS,
        "static build tools",
        "static builds need",
    )
}

/// The toolchain pinned by `rust-toolchain.toml` and its components. The toolchain
/// itself must already be installed (`rustup toolchain install`) or cargo could not
/// have started xtask; missing components are added.
fn toolchain(ws: &Workspace, say: &dyn Fn(String)) -> Result<()> {
    let file = ws.root.join("rust-toolchain.toml");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let ToolchainFile {
        toolchain: Toolchain {
            channel,
            components,
        },
    } = toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    if find_binary("rustup").is_none() {
        eprintln!("setup: rustup not found; not checking toolchain {channel}");
        return Ok(());
    }
    let installed = ws
        .command("rustup")
        .args(["component", "list", "--installed", "--toolchain", &channel])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
    let Some(installed) = installed else {
        // Reads rust-toolchain.toml: installs the channel with its components.
        return exec::run(ws.command("rustup").args(["toolchain", "install"]));
    };
    let missing: Vec<&str> = components
        .iter()
        .map(String::as_str)
        .filter(|component| {
            // Lines look like `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
            !installed
                .lines()
                .any(|line| line == *component || line.starts_with(&format!("{component}-")))
        })
        .collect();
    if missing.is_empty() {
        say(format!(
            "toolchain {channel} with {} ok",
            components.join(", ")
        ));
        return Ok(());
    }
    exec::run(
        ws.command("rustup")
            .args(["component", "add", "--toolchain", &channel])
            .args(&missing),
    )
}

/// The standard library of `triple` for the pinned toolchain, added with rustup when it
/// is missing. Only the static builds need one, so it is installed when they run
/// rather than listed in `rust-toolchain.toml` (which would make every `rustup
/// toolchain install` download them: about 10 s for the two musl targets).
pub fn rust_target(ws: &Workspace, triple: &str) -> Result<()> {
    if find_binary("rustup").is_none() {
        eprintln!("setup: rustup not found; assuming the target {triple} is installed");
        return Ok(());
    }
    let installed = exec::output(ws.command("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|line| line.trim() == triple) {
        return Ok(());
    }
    exec::run(ws.command("rustup").args(["target", "add", triple]))
}

/// What setup reads of `rust-toolchain.toml`; rustup's other keys are ignored.
#[derive(Debug, serde::Deserialize)]
struct ToolchainFile {
    toolchain: Toolchain,
}

/// The `[toolchain]` table.
#[derive(Debug, serde::Deserialize)]
struct Toolchain {
    channel: String,
    #[serde(default)]
    components: Vec<String>,
}

/// bpf-linker in `.tools/bin`, built against the pinned toolchain's own LLVM (the one
/// that emits the bitcode it links). Rebuilt when it is missing, does not run, or was
/// built against another toolchain's LLVM (or its last build did not finish).
fn bpf_linker(ws: &Workspace, say: &dyn Fn(String)) -> Result<()> {
    let tools = ws.tools_dir();
    let llvm_lib = tools.join("llvm").join("lib");
    let libllvm = toolchain_libllvm(ws)?;
    // Written after a successful install: the libLLVM that bpf-linker was built against.
    let stamp = tools.join("bpf-linker.llvm");
    let built_against = fs::read_to_string(&stamp).ok().map(PathBuf::from);
    let linker = tools.join("bin").join("bpf-linker");
    let version = Command::new(&linker)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let want = format!("bpf-linker {BPF_LINKER_VERSION}");
    if version.as_deref() == Some(want.as_str()) && built_against.as_deref() == Some(&*libllvm) {
        say(format!("{want} ok (LLVM {})", libllvm.display()));
        return Ok(());
    }
    eprintln!(
        "setup: building {want} into {} against {} (takes a minute or two)",
        tools.display(),
        libllvm.display()
    );
    // bpf-linker's build finds LLVM through LLVM_PREFIX/lib/libLLVM.so, and the
    // binary's rpath loads it from there by the library's own file name.
    if llvm_lib.exists() {
        fs::remove_dir_all(&llvm_lib)
            .with_context(|| format!("removing {}", llvm_lib.display()))?;
    }
    fs::create_dir_all(&llvm_lib).with_context(|| format!("creating {}", llvm_lib.display()))?;
    let file_name = libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(file_name)] {
        let link = llvm_lib.join(name);
        symlink(&libllvm, &link).with_context(|| format!("creating {}", link.display()))?;
    }
    exec::run(
        ws.cargo()
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--force", "--root"])
            .arg(&tools)
            .env("LLVM_PREFIX", tools.join("llvm")),
    )?;
    let out = exec::output(Command::new(&linker).arg("--version"))?;
    if out.trim() != want {
        bail!(
            "{} reports `{}`, expected `{want}`",
            linker.display(),
            out.trim()
        );
    }
    fs::write(&stamp, libllvm.as_os_str().as_encoded_bytes())
        .with_context(|| format!("writing {}", stamp.display()))
}

/// Where [`cargo_fuzz`] installs cargo-fuzz: its own root, so that its `bin` can go
/// first on `PATH` without bringing anything else along.
pub fn cargo_fuzz_root(ws: &Workspace) -> PathBuf {
    ws.tools_dir().join("cargo-fuzz")
}

/// cargo-fuzz in `.tools/cargo-fuzz/bin`, built from crates.io with its lock file by
/// the pinned toolchain. Reinstalled when missing or of another version.
fn cargo_fuzz(ws: &Workspace, say: &dyn Fn(String)) -> Result<()> {
    let root = cargo_fuzz_root(ws);
    let bin = root.join("bin").join("cargo-fuzz");
    let want = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    // `cargo-fuzz --version` prints `cargo-fuzz 0.13.2`.
    let version = Command::new(&bin)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    if version.as_deref() == Some(want.as_str()) {
        say(format!("{want} ok"));
        return Ok(());
    }
    eprintln!(
        "setup: building {want} into {} (takes a few minutes)",
        root.display()
    );
    exec::run(
        ws.cargo()
            .args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION])
            .args(["--locked", "--force", "--root"])
            .arg(&root),
    )?;
    let out = exec::output(Command::new(&bin).arg("--version"))?;
    if out.trim() != want {
        bail!(
            "{} reports `{}`, expected `{want}`",
            bin.display(),
            out.trim()
        );
    }
    Ok(())
}

/// The toolchain's `lib/libLLVM.so.<major>.<minor>-rust-<version>`.
fn toolchain_libllvm(ws: &Workspace) -> Result<PathBuf> {
    let out = ws
        .command("rustc")
        .args(["--print", "sysroot"])
        .stderr(Stdio::inherit())
        .output()
        .context("could not run `rustc --print sysroot`")?;
    if !out.status.success() {
        bail!("`rustc --print sysroot` failed: {}", out.status);
    }
    let lib = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("lib");
    let mut found: Vec<PathBuf> = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libLLVM.so.") && name.contains("-rust-"))
        })
        .collect();
    found.sort();
    found.pop().with_context(|| {
        format!(
            "no libLLVM.so.*-rust-* in {}: the toolchain ships no LLVM to build bpf-linker with",
            lib.display()
        )
    })
}

/// The binaries of `tools` that are not installed.
fn missing_binaries<'a>(tools: &[(&'a str, &str)]) -> Vec<&'a str> {
    tools
        .iter()
        .filter(|(binary, _)| find_binary(binary).is_none())
        .map(|&(binary, _)| binary)
        .collect()
}

/// The packages of `tools`, sorted, once each.
fn packages_of<'a>(tools: &[(&str, &'a str)]) -> Vec<&'a str> {
    let mut packages: Vec<&str> = tools.iter().map(|&(_, package)| package).collect();
    packages.sort_unstable();
    packages.dedup();
    packages
}

/// The Debian packages of `tools` (binary, package) whose binary is missing, installed
/// with apt-get (root only; otherwise a note names them). `what` names the set in
/// messages.
fn debian_tools(tools: &[(&str, &str)], what: &str, say: &dyn Fn(String)) -> Result<()> {
    let missing: Vec<(&str, &str)> = tools
        .iter()
        .copied()
        .filter(|(binary, _)| find_binary(binary).is_none())
        .collect();
    let packages = packages_of(&missing);
    if packages.is_empty() {
        say(format!("{what} ok"));
        return Ok(());
    }
    let list = packages.join(" ");
    if !is_root() {
        eprintln!("setup: not root, not installing missing {what}: {list}");
        return Ok(());
    }
    if find_binary("apt-get").is_none() {
        eprintln!("setup: no apt-get; install these yourself: {list}");
        return Ok(());
    }
    let apt = || {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        cmd
    };
    exec::run(apt().args(["-q", "update"]))?;
    exec::run(
        apt()
            .args(["-q", "install", "-y", "--no-install-recommends"])
            .args(&packages),
    )?;
    let still_missing = missing_binaries(tools);
    if !still_missing.is_empty() {
        bail!(
            "still missing after apt-get install: {}",
            still_missing.join(" ")
        );
    }
    Ok(())
}

/// bpffs at /sys/fs/bpf (for pinning and bpftool), mounted when absent (root only).
fn bpffs(say: &dyn Fn(String)) -> Result<()> {
    const DIR: &str = "/sys/fs/bpf";
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(DIR) && fields.next() == Some("bpf")
    });
    if mounted {
        say(format!("bpffs at {DIR} ok"));
        return Ok(());
    }
    if !is_root() {
        eprintln!("setup: not root, not mounting bpffs at {DIR}");
        return Ok(());
    }
    fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;
    exec::run(Command::new("mount").args(["-t", "bpf", "bpf", DIR]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Toolchain, toml::de::Error> {
        toml::from_str::<ToolchainFile>(text).map(|file| file.toolchain)
    }

    #[test]
    fn parses_toolchain_file() {
        let text = "# comment\n[toolchain]\nchannel = \"nightly-2026-10-01\"\n\
                    components = [\"rust-src\", \"rustfmt\", \"clippy\"]\nprofile = \"minimal\"\n";
        let toolchain = parse(text).unwrap();
        assert_eq!(toolchain.channel, "nightly-2026-10-01");
        assert_eq!(toolchain.components, ["rust-src", "rustfmt", "clippy"]);
    }

    #[test]
    fn toolchain_file_without_channel_is_rejected() {
        let e = parse("[toolchain]\nprofile = \"minimal\"\n").unwrap_err();
        assert!(e.message().contains("missing field `channel`"), "{e}");
    }

    #[test]
    fn repository_toolchain_file_parses() {
        let ws = Workspace::locate().unwrap();
        let text = fs::read_to_string(ws.root.join("rust-toolchain.toml")).unwrap();
        let toolchain = parse(&text).unwrap();
        assert!(
            toolchain.channel.starts_with("nightly-"),
            "{}",
            toolchain.channel
        );
        assert!(toolchain.components.iter().any(|c| c == "rust-src"));
    }
}
