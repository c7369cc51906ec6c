//! The guest's initramfs: busybox, the host programs the testbed runs (with the
//! shared libraries `ldd` names) or, for a guest of another architecture, those of
//! its Debian packages ([`super::userland`]), the kernel modules the tests need, the
//! agent, the eBPF objects, the test binaries and `/init` (`xtask/vm/init`). Staged in
//! `target/vm/rootfs/` (removed afterwards unless kept), archived with `cpio -H newc`
//! and gzip into `target/vm/initramfs.cpio.gz`.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::Write as _,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::{Selection, kernel::Kernel, userland};
use crate::{arch::Arch, exec, setup, workspace::find_binary};

/// The guest's `/init`.
const INIT: &str = include_str!("../../vm/init");

/// Module subtrees (under `lib/modules/<release>/kernel/`) copied into the guest: the
/// network stack's modules (bridge, VXLAN's UDP tunnels, clsact and `cls_bpf`,
/// nftables, xfrm and ESP, openvswitch for a real weaver's fast datapath) and the
/// crypto and library modules they pull in. Anything the kernel requests from these
/// loads by itself.
/// The architecture's own crypto modules are added ([`arch_module_dir`]).
const MODULE_DIRS: &[&str] = &[
    "crypto",
    "lib",
    "net/802",
    "net/8021q",
    "net/bridge",
    "net/core",
    "net/ipv4",
    "net/ipv6",
    "net/key",
    "net/llc",
    "net/netfilter",
    "net/netlink",
    "net/nsh",
    "net/openvswitch",
    "net/packet",
    "net/psample",
    "net/sched",
    "net/xfrm",
    "drivers/net/vxlan",
];

/// The module subtree of `arch`'s accelerated crypto.
fn arch_module_dir(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "arch/x86/crypto",
        Arch::Aarch64 => "arch/arm64/crypto",
    }
}

/// Single modules copied besides [`MODULE_DIRS`]: the link kinds the testbed creates.
const MODULE_FILES: &[&str] = &[
    "drivers/net/dummy.ko",
    "drivers/net/ifb.ko",
    "drivers/net/macvlan.ko",
    "drivers/net/tun.ko",
    "drivers/net/veth.ko",
];

/// Where things go in the guest.
pub mod guest {
    /// The agent binary.
    pub const AGENT: &str = "/weft/bin/weft";
    /// A Weave router, when `WEFT_WEAVER` names one.
    pub const WEAVER: &str = "/weft/bin/weaver";
    /// The eBPF object.
    pub const EBPF_OBJECT: &str = "/weft/ebpf/weft";
    /// The variant eBPF object (the upgrade test).
    pub const EBPF_VARIANT_OBJECT: &str = "/weft/ebpf/weft-variant";
    /// The test binaries, by file name (`datapath`, `lifecycle`, ...).
    pub const TESTS: &str = "/weft/tests";
}

/// What goes into the initramfs besides the fixed parts.
#[derive(Debug)]
pub struct Contents<'a> {
    /// The kernel whose modules are copied.
    pub kernel: &'a Kernel,
    /// The agent binary (release build).
    pub agent: &'a Path,
    /// The eBPF object.
    pub ebpf_object: &'a Path,
    /// The variant eBPF object, if the tests get one.
    pub ebpf_variant_object: Option<&'a Path>,
    /// The guest's architecture.
    pub arch: Arch,
    /// For a guest of another architecture than the host's: the unpacked Debian
    /// packages its programs and libraries come from ([`userland::fetch`]); the
    /// binaries given here are then taken as they are (static, already stripped).
    pub userland: Option<&'a Path>,
    /// Test binaries by file name.
    pub tests: &'a [(String, PathBuf)],
    /// What the guest runs.
    pub selection: &'a [Selection],
    /// A Weave router to copy (from `WEFT_WEAVER`).
    pub weaver: Option<&'a Path>,
    /// Seconds each test may run in the guest before it is killed.
    pub test_timeout: u64,
}

/// Builds `<vm_dir>/initramfs.cpio.gz` and returns its path. The staging directory
/// `<vm_dir>/rootfs` is removed afterwards unless `keep`.
pub fn build(vm_dir: &Path, contents: &Contents<'_>, keep: bool) -> Result<PathBuf> {
    let root = vm_dir.join("rootfs");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let mut stage = Stage::new(&root, contents.userland.is_some())?;
    stage.populate(contents)?;
    let archive = vm_dir.join("initramfs.cpio.gz");
    let result = archive_to(&root, &archive);
    if keep {
        eprintln!("vm: kept the initramfs tree in {}", root.display());
    } else {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    result?;
    let size = fs::metadata(&archive)
        .with_context(|| format!("reading {}", archive.display()))?
        .len();
    eprintln!("vm: initramfs {} ({:.1} MiB)", archive.display(), mib(size));
    Ok(archive)
}

/// The staging tree.
struct Stage {
    root: PathBuf,
    /// Libraries already copied (host paths).
    libs: BTreeSet<PathBuf>,
    /// Another architecture's guest: no `ldd`, no `objcopy`.
    foreign: bool,
}

impl Stage {
    fn new(root: &Path, foreign: bool) -> Result<Self> {
        for dir in [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "dev",
            "etc",
            "proc",
            "root",
            "run",
            "sys",
            "tmp",
            "weft/bin",
            "weft/ebpf",
            "weft/tests",
        ] {
            let path = root.join(dir);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        fs::create_dir_all(root.join("var")).context("creating var")?;
        symlink("../run", root.join("var/run")).context("linking /var/run")?;
        Ok(Self {
            root: root.to_path_buf(),
            libs: BTreeSet::new(),
            foreign,
        })
    }

    fn populate(&mut self, c: &Contents<'_>) -> Result<()> {
        if let Some(userland) = c.userland {
            self.busybox(userland::PROGRAMS, &userland.join("bin/busybox"))?;
            for program in userland::PROGRAMS {
                let guest = userland::find(userland, program)?;
                let host = userland.join(guest.strip_prefix("/").unwrap_or(&guest));
                copy(&host, &self.path(&guest)?)?;
            }
            // The packages' shared libraries and the dynamic loader, where they were.
            for dir in ["lib", "usr/lib"] {
                copy_tree(&userland.join(dir), &self.root.join(dir))?;
            }
        } else {
            let programs: Vec<&str> = setup::DEBIAN_TOOLS
                .iter()
                .map(|&(binary, _)| binary)
                .filter(|binary| *binary != "strip")
                .collect();
            let busybox = find_binary("busybox").context("busybox is not installed")?;
            self.busybox(&programs, &busybox)?;
            for program in &programs {
                let path = find_binary(program).with_context(|| {
                    format!("`{program}` is not installed (`cargo xtask setup`)")
                })?;
                self.program(&path, &path)?;
            }
        }
        self.modules(c.kernel, c.arch)?;
        self.stripped(c.agent, guest::AGENT)?;
        self.file(c.ebpf_object, guest::EBPF_OBJECT)?;
        for (name, binary) in c.tests {
            self.stripped(binary, &format!("{}/{name}", guest::TESTS))?;
        }
        let mut env = vec![
            ("WEFT_AGENT_BIN", guest::AGENT.to_owned()),
            ("WEFT_EBPF_OBJECT", guest::EBPF_OBJECT.to_owned()),
            ("WEFT_VM_TEST_TIMEOUT", c.test_timeout.to_string()),
        ];
        if let Some(variant) = c.ebpf_variant_object {
            self.file(variant, guest::EBPF_VARIANT_OBJECT)?;
            env.push((
                "WEFT_EBPF_VARIANT_OBJECT",
                guest::EBPF_VARIANT_OBJECT.to_owned(),
            ));
        }
        if let Some(weaver) = c.weaver {
            self.program(weaver, Path::new(guest::WEAVER))?;
            self.iptables()?;
            env.push(("WEFT_WEAVER", guest::WEAVER.to_owned()));
        }
        let env: String = env
            .iter()
            .map(|(key, value)| format!("export {key}={value}\n"))
            .collect();
        self.write("weft/env", &env, 0o644)?;
        let selection: String = c.selection.iter().map(|s| s.line() + "\n").collect();
        self.write("weft/selection", &selection, 0o644)?;
        self.write("init", INIT, 0o755)?;
        self.write(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\ntcpdump:x:104:109::/nonexistent:/bin/false\n\
             nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        )?;
        self.write(
            "etc/group",
            "root:x:0:\ntcpdump:x:109:\nnogroup:x:65534:\n",
            0o644,
        )?;
        self.write("etc/hosts", "127.0.0.1 localhost weft-vm\n", 0o644)?;
        self.write(
            "etc/nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files\n",
            0o644,
        )?;
        self.write(
            "etc/protocols",
            "ip 0 IP\nicmp 1 ICMP\ntcp 6 TCP\nudp 17 UDP\nesp 50 ESP\n",
            0o644,
        )?;
        self.write("etc/profile", "PS1='weft-vm# '\n", 0o644)
    }

    /// Busybox (the guest's: `binary`) and a link for each of its applets, except the
    /// names in `programs` (Debian's static busybox prefers its own applets to `$PATH`:
    /// an applet named like a host program would shadow it in the guest's shell). The
    /// applet list comes from the host's busybox, the same Debian package.
    fn busybox(&mut self, programs: &[&str], binary: &Path) -> Result<()> {
        let host_busybox = find_binary("busybox").context("busybox is not installed")?;
        self.program(binary, Path::new("/bin/busybox"))?;
        let list = exec::output(Command::new(&host_busybox).arg("--list-full"))?;
        for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let name = applet.rsplit('/').next().unwrap_or(applet);
            if name == "busybox" || programs.contains(&name) {
                continue;
            }
            let link = self.root.join(applet);
            if link.exists() {
                continue;
            }
            let depth = applet.matches('/').count();
            let target = format!("{}bin/busybox", "../".repeat(depth));
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            symlink(&target, &link).with_context(|| format!("linking {}", link.display()))?;
        }
        Ok(())
    }

    /// Copies the executable `host` to `guest` (an absolute guest path) with the
    /// shared libraries it loads.
    fn program(&mut self, host: &Path, guest: &Path) -> Result<()> {
        let dest = self.path(guest)?;
        copy(host, &dest)?;
        self.libraries(host)
    }

    /// Copies the libraries `ldd` lists for `binary` (none for a static one) to their
    /// host paths in the guest.
    fn libraries(&mut self, binary: &Path) -> Result<()> {
        if self.foreign {
            return Ok(());
        }
        let out = Command::new("ldd")
            .arg(binary)
            .stdin(Stdio::null())
            .output()
            .context("could not run ldd")?;
        // ldd fails on a static binary ("not a dynamic executable"): no libraries.
        if !out.status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        for lib in parse_ldd(&text) {
            if lib.as_os_str().is_empty() {
                bail!("ldd {}: unresolved library in:\n{text}", binary.display());
            }
            if self.libs.insert(lib.clone()) {
                let dest = self.path(&lib)?;
                copy(&lib, &dest)?;
            }
        }
        Ok(())
    }

    /// Copies `host` to `guest` without its debug information (`objcopy
    /// --strip-debug`), then its libraries.
    fn stripped(&mut self, host: &Path, guest: &str) -> Result<()> {
        let dest = self.path(Path::new(guest))?;
        if self.foreign {
            // The host's objcopy knows only its own architecture; these binaries were
            // built stripped.
            return copy(host, &dest);
        }
        let status = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(host)
            .arg(&dest)
            .status()
            .context("could not run objcopy (binutils)")?;
        if !status.success() {
            bail!("objcopy --strip-debug {} failed: {status}", host.display());
        }
        self.libraries(host)
    }

    /// Copies a plain file.
    fn file(&mut self, host: &Path, guest: &str) -> Result<()> {
        let dest = self.path(Path::new(guest))?;
        copy(host, &dest)
    }

    /// iptables (as the nft variant, with its extensions), which a Weave router needs.
    fn iptables(&mut self) -> Result<()> {
        let Some(iptables) = find_binary("iptables") else {
            eprintln!("vm: no iptables on this host; a weaver in the guest will lack it");
            return Ok(());
        };
        let real = fs::canonicalize(&iptables)
            .with_context(|| format!("resolving {}", iptables.display()))?;
        self.program(&real, &real)?;
        for name in ["iptables", "iptables-save", "iptables-restore"] {
            let link = self.root.join("usr/sbin").join(name);
            if !link.exists() {
                symlink(&real, &link).with_context(|| format!("linking {}", link.display()))?;
            }
        }
        let extensions = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
        if let Ok(entries) = fs::read_dir(extensions) {
            for entry in entries.flatten() {
                let path = entry.path();
                self.program(&path, &path)?;
            }
        }
        Ok(())
    }

    /// The kernel modules of [`MODULE_DIRS`] and [`MODULE_FILES`], with `modules.dep`
    /// and `modules.alias` from `depmod -b`.
    fn modules(&mut self, kernel: &Kernel, arch: Arch) -> Result<()> {
        let dest = self.root.join("lib/modules").join(&kernel.release);
        for dir in MODULE_DIRS.iter().chain([&arch_module_dir(arch)]) {
            copy_tree(
                &kernel.modules.join("kernel").join(dir),
                &dest.join("kernel").join(dir),
            )?;
        }
        for file in MODULE_FILES {
            let target = dest.join("kernel").join(file);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            copy(&kernel.modules.join("kernel").join(file), &target)?;
        }
        for file in [
            "modules.builtin",
            "modules.builtin.modinfo",
            "modules.order",
        ] {
            copy(&kernel.modules.join(file), &dest.join(file))?;
        }
        let depmod = find_binary("depmod").context("depmod is not installed (kmod)")?;
        exec::run(
            Command::new(depmod)
                .arg("-b")
                .arg(&self.root)
                .arg(&kernel.release),
        )
    }

    /// `guest` (absolute) inside the staging tree, its parent directory created.
    fn path(&self, guest: &Path) -> Result<PathBuf> {
        let relative = guest
            .strip_prefix("/")
            .with_context(|| format!("guest path {} is not absolute", guest.display()))?;
        let path = self.root.join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        Ok(path)
    }

    /// Writes `text` to `relative` with permissions `mode`.
    fn write(&self, relative: &str, text: &str, mode: u32) -> Result<()> {
        let path = self.root.join(relative);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))
    }
}

/// The library paths in `ldd` output: `name => /path (0x...)` and the interpreter's
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`. An unresolved `name => not found` yields an
/// empty path; the kernel's `linux-vdso.so.1` is skipped.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) if rest.trim().starts_with("not found") => "",
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            (path.is_empty() || path.starts_with('/')).then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies the file `from` (following links) to `to`, keeping its permissions.
fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// Copies the directory tree `from` to `to` (files and directories; links followed).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry.with_context(|| format!("reading {}", from.display()))?;
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else {
            copy(&path, &target)?;
        }
    }
    Ok(())
}

/// Archives the tree `root` as `cpio -H newc` (every file owned by root), compressed
/// with gzip, into `archive`.
fn archive_to(root: &Path, archive: &Path) -> Result<()> {
    let mut names = Vec::new();
    list_tree(root, Path::new("."), &mut names)?;
    let out = File::create(archive).with_context(|| format!("creating {}", archive.display()))?;
    let mut gzip = Command::new("gzip")
        .arg("-3")
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("could not start gzip")?;
    let gzip_in = gzip.stdin.take().context("gzip has no stdin")?;
    let mut cpio = Command::new("cpio")
        .args([
            "--create",
            "--null",
            "--format=newc",
            "--owner=0:0",
            "--quiet",
        ])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(gzip_in)
        .spawn()
        .context("could not start cpio")?;
    let mut cpio_in = cpio.stdin.take().context("cpio has no stdin")?;
    let written = cpio_in.write_all(&names);
    drop(cpio_in);
    let cpio_status = cpio.wait().context("waiting for cpio")?;
    let gzip_status = gzip.wait().context("waiting for gzip")?;
    written.context("writing the file list to cpio")?;
    if !cpio_status.success() {
        bail!("cpio failed: {cpio_status}");
    }
    if !gzip_status.success() {
        bail!("gzip failed: {gzip_status}");
    }
    Ok(())
}

/// Appends `relative` and everything below it, NUL-terminated, parents first.
fn list_tree(root: &Path, relative: &Path, names: &mut Vec<u8>) -> Result<()> {
    names.extend_from_slice(relative.as_os_str().as_encoded_bytes());
    names.push(0);
    let path = root.join(relative);
    let meta =
        fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<_> = fs::read_dir(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.file_name()))
            .collect();
        entries.sort();
        for name in entries {
            list_tree(root, &relative.join(name), names)?;
        }
    }
    Ok(())
}

/// Bytes as MiB, for messages.
fn mib(bytes: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let bytes = bytes as f64;
    bytes / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibelf.so.1 => /lib/x86_64-linux-gnu/libelf.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libelf.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(parse_ldd("\tlibx.so => not found\n"), [PathBuf::new()]);
    }
}
