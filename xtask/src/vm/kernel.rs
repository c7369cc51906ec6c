//! The guest kernel: Debian 12's own 6.1 kernel, the `linux-image-6.1.0-<n>-<arch>`
//! package that bookworm's `linux-image-<arch>` depends on (`amd64`, or `arm64` from
//! apt's foreign architecture), fetched with `apt-get download` and unpacked with
//! `dpkg-deb -x` into `target/vm/kernel/<package>/` (`target/vm/kernel-arm64/` for
//! arm64), where later runs find it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{arch::Arch, exec, setup, workspace::Workspace};

/// The metapackage whose dependency names the kernel package: `linux-image-<arch>`.
fn metapackage(arch: Arch) -> String {
    format!("linux-image-{}", arch.oci())
}
/// Every kernel package this task accepts starts so (bookworm's 6.1 series).
const PACKAGE_PREFIX: &str = "linux-image-6.1.";
/// Names another kernel package instead of the metapackage's (for instance an older
/// one still in the Debian archive); x86_64 guests only.
pub const PACKAGE_ENV: &str = "WEFT_VM_KERNEL_PACKAGE";
/// Written into an unpacked package's directory once unpacking finished.
const STAMP: &str = ".unpacked";

/// An unpacked kernel package.
#[derive(Debug)]
pub struct Kernel {
    /// The Debian package, like `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// The kernel release, like `6.1.0-56-amd64` (`uname -r`).
    pub release: String,
    /// `boot/vmlinuz-<release>`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    pub modules: PathBuf,
}

/// Returns the kernel of `arch`, downloading and unpacking it unless it is already
/// cached.
pub fn fetch(ws: &Workspace, arch: Arch) -> Result<Kernel> {
    let host = arch == Arch::host()?;
    let dir = ws.target_dir.join("vm").join(if host {
        "kernel".to_owned()
    } else {
        format!("kernel-{}", arch.oci())
    });
    let package = match std::env::var(PACKAGE_ENV) {
        Ok(package) if !package.is_empty() && host => package,
        _ => candidate_package(arch)?,
    };
    if !package.starts_with(PACKAGE_PREFIX)
        || !package
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.+".contains(c))
    {
        bail!(
            "kernel package `{package}` is not a Debian 12 6.1 kernel package \
             ({PACKAGE_PREFIX}*): the VM tests need bookworm's apt sources"
        );
    }
    let unpacked = dir.join(&package);
    if unpacked.join(STAMP).is_file() {
        eprintln!("vm: kernel {package} (cached in {})", unpacked.display());
        return locate(&package, &unpacked);
    }
    download(&dir, &package, &apt_name(&package, arch)?, &unpacked)?;
    locate(&package, &unpacked)
}

/// The name apt takes for `package` of `arch`: `<package>:<arch>` for a foreign one.
pub fn apt_name(package: &str, arch: Arch) -> Result<String> {
    Ok(if arch == Arch::host()? {
        package.to_owned()
    } else {
        format!("{package}:{}", arch.oci())
    })
}

/// The kernel package `linux-image-<arch>` depends on, from apt's package lists
/// (updated once if they do not know the metapackage; a foreign architecture is
/// added to dpkg's first).
fn candidate_package(arch: Arch) -> Result<String> {
    setup::foreign_architecture(arch)?;
    let meta = apt_name(&metapackage(arch), arch)?;
    if let Some(package) = metapackage_dependency(&meta)? {
        return Ok(package);
    }
    eprintln!("vm: apt does not know {meta}; updating its package lists");
    exec::run(
        Command::new("apt-get")
            .args(["-q", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
    .context("apt-get update (to find the guest kernel package)")?;
    metapackage_dependency(&meta)?.with_context(|| {
        format!(
            "apt knows no {meta} even after `apt-get update`: the VM tests need \
             Debian 12 (bookworm) apt sources, or {PACKAGE_ENV} naming a kernel package"
        )
    })
}

/// `apt-cache depends linux-image-amd64` → `linux-image-6.1.0-<n>-amd64` (the
/// `:arm64` of a foreign package dropped), or `None` when apt does not know the
/// metapackage.
fn metapackage_dependency(meta: &str) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["depends", meta])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("could not run apt-cache (the VM tests fetch their kernel with apt)")?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(parse_depends(&String::from_utf8_lossy(&out.stdout)))
}

/// The first `Depends: linux-image-...` of `apt-cache depends` output, without an
/// architecture suffix.
fn parse_depends(text: &str) -> Option<String> {
    let mut lines = text.lines();
    let meta = lines.next()?.trim();
    let meta = meta.split_once(':').map_or(meta, |(name, _)| name);
    lines
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(|package| {
            let package = package.trim();
            package.split_once(':').map_or(package, |(name, _)| name)
        })
        .find(|package| package.starts_with("linux-image-") && *package != meta)
        .map(str::to_owned)
}

/// Downloads `package` (`apt_name` for apt) into `dir` and unpacks it into
/// `unpacked`; other cached kernels are removed.
fn download(dir: &Path, package: &str, apt_name: &str, unpacked: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    exec::run(
        Command::new("apt-get")
            .args(["-q", "download", apt_name])
            .current_dir(dir)
            .stdin(Stdio::null()),
    )
    .with_context(|| format!("downloading the guest kernel {package} with apt-get"))?;
    let deb = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
                })
        })
        .with_context(|| {
            format!(
                "apt-get download left no {package}_*.deb in {}",
                dir.display()
            )
        })?;
    exec::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(unpacked))?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    fs::write(unpacked.join(STAMP), package).context("writing the unpack stamp")
}

/// Finds the kernel image and modules of an unpacked package.
fn locate(package: &str, unpacked: &Path) -> Result<Kernel> {
    let modules_dir = unpacked.join("lib").join("modules");
    let release = fs::read_dir(&modules_dir)
        .with_context(|| format!("reading {}", modules_dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .next()
        .with_context(|| format!("{package} has no lib/modules/<release>"))?;
    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{package} has no {}", vmlinuz.display());
    }
    Ok(Kernel {
        package: package.to_owned(),
        modules: modules_dir.join(&release),
        release,
        vmlinuz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let text = "linux-image-arm64:arm64\n  Depends: linux-image-6.1.0-56-arm64:arm64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-arm64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }
}
