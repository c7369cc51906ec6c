//! The programs of a guest whose architecture is not the host's (arm64 on an x86_64
//! machine): Debian 12's own packages of that architecture (busybox, iproute2,
//! iputils-ping and the libraries they load), fetched with `apt-get download
//! <package>:<arch>` and unpacked with `dpkg-deb -x` into
//! `target/vm/userland-<arch>/`, where later runs find them. The host's programs cannot
//! serve (another instruction set), and Debian's busybox `ip` lacks what the testbed
//! needs (it ignores `peer name` for veth pairs).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::kernel::apt_name;
use crate::{arch::Arch, exec, setup, workspace::Workspace};

/// The Debian 12 packages unpacked: busybox, the programs of [`PROGRAMS`], and the
/// shared libraries those load (their `Depends` that ship libraries, followed down).
pub const PACKAGES: &[&str] = &[
    "busybox-static",
    "iproute2",
    "iputils-ping",
    "libc6",
    "libgcc-s1",
    "libbpf1",
    "libelf1",
    "zlib1g",
    "libbsd0",
    "libmd0",
    "libcap2",
    "libdb5.3",
    "libmnl0",
    "libselinux1",
    "libpcre2-8-0",
    "libtirpc3",
    "libgssapi-krb5-2",
    "libkrb5-3",
    "libk5crypto3",
    "libkrb5support0",
    "libcom-err2",
    "libkeyutils1",
    "libssl3",
    "libxtables12",
    "libidn2-0",
    "libunistring2",
];

/// The programs the tests run that come from [`PACKAGES`] rather than busybox.
pub const PROGRAMS: &[&str] = &["ip", "bridge", "tc", "ping"];

/// Written into the unpacked tree once unpacking finished; holds the package list, so
/// a changed list unpacks again.
const STAMP: &str = ".unpacked";

/// Returns the unpacked tree of [`PACKAGES`] for `arch`, downloading it unless cached.
pub fn fetch(ws: &Workspace, arch: Arch) -> Result<PathBuf> {
    let root = ws
        .target_dir
        .join("vm")
        .join(format!("userland-{}", arch.oci()));
    let want = PACKAGES.join("\n");
    if fs::read_to_string(root.join(STAMP)).is_ok_and(|have| have == want) {
        eprintln!("vm: {arch} programs (cached in {})", root.display());
        return Ok(root);
    }
    setup::foreign_architecture(arch)?;
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let debs = root.join(".debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let names = PACKAGES
        .iter()
        .map(|package| apt_name(package, arch))
        .collect::<Result<Vec<_>>>()?;
    exec::run(
        Command::new("apt-get")
            .args(["-q", "download"])
            .args(&names)
            .current_dir(&debs)
            .stdin(Stdio::null()),
    )
    .with_context(|| format!("downloading the {arch} guest's programs with apt-get"))?;
    let mut count = 0;
    for entry in fs::read_dir(&debs).with_context(|| format!("reading {}", debs.display()))? {
        let deb = entry
            .with_context(|| format!("reading {}", debs.display()))?
            .path();
        if deb.extension().is_some_and(|ext| ext == "deb") {
            exec::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
            count += 1;
        }
    }
    if count != PACKAGES.len() {
        bail!(
            "apt-get download left {count} packages in {}, expected {}",
            debs.display(),
            PACKAGES.len()
        );
    }
    fs::remove_dir_all(&debs).with_context(|| format!("removing {}", debs.display()))?;
    fs::write(root.join(STAMP), want).context("writing the unpack stamp")?;
    Ok(root)
}

/// Where `program` is in the unpacked tree `root`, as a guest path (`/bin/ip`).
pub fn find(root: &Path, program: &str) -> Result<PathBuf> {
    ["bin", "sbin", "usr/bin", "usr/sbin"]
        .iter()
        .map(|dir| Path::new("/").join(dir).join(program))
        .find(|guest| {
            root.join(guest.strip_prefix("/").unwrap_or(guest))
                .is_file()
        })
        .with_context(|| format!("no {program} in {}", root.display()))
}
