//! The guest kernel: Debian 12's own 6.1 kernel, the `linux-image-6.1.0-<n>-amd64`
//! package that bookworm's `linux-image-amd64` depends on, fetched with `apt-get
//! download` and unpacked with `dpkg-deb -x` into `target/vm/kernel/<package>/`, where
//! later runs find it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{exec, workspace::Workspace};

/// The metapackage whose dependency names the kernel package.
const METAPACKAGE: &str = "linux-image-amd64";
/// Every kernel package this task accepts starts so (bookworm's 6.1 series).
const PACKAGE_PREFIX: &str = "linux-image-6.1.";
/// Names another kernel package instead of the metapackage's (for instance an older
/// one still in the Debian archive).
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

/// Returns the kernel, downloading and unpacking it unless it is already cached.
pub fn fetch(ws: &Workspace) -> Result<Kernel> {
    let dir = ws.target_dir.join("vm").join("kernel");
    let package = match std::env::var(PACKAGE_ENV) {
        Ok(package) if !package.is_empty() => package,
        _ => candidate_package()?,
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
    download(&dir, &package, &unpacked)?;
    locate(&package, &unpacked)
}

/// The kernel package `linux-image-amd64` depends on, from apt's package lists
/// (updated once if they do not know the metapackage).
fn candidate_package() -> Result<String> {
    if let Some(package) = metapackage_dependency()? {
        return Ok(package);
    }
    eprintln!("vm: apt does not know {METAPACKAGE}; updating its package lists");
    exec::run(
        Command::new("apt-get")
            .args(["-q", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
    .context("apt-get update (to find the guest kernel package)")?;
    metapackage_dependency()?.with_context(|| {
        format!(
            "apt knows no {METAPACKAGE} even after `apt-get update`: the VM tests need \
             Debian 12 (bookworm) apt sources, or {PACKAGE_ENV} naming a kernel package"
        )
    })
}

/// `apt-cache depends linux-image-amd64` → `linux-image-6.1.0-<n>-amd64`, or `None`
/// when apt does not know the metapackage.
fn metapackage_dependency() -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["depends", METAPACKAGE])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("could not run apt-cache (the VM tests fetch their kernel with apt)")?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(parse_depends(&String::from_utf8_lossy(&out.stdout)))
}

/// The first `Depends: linux-image-...` of `apt-cache depends` output.
fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|package| package.starts_with("linux-image-") && *package != METAPACKAGE)
        .map(str::to_owned)
}

/// Downloads `package` into `dir` and unpacks it into `unpacked`; other cached kernels
/// are removed.
fn download(dir: &Path, package: &str, unpacked: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    exec::run(
        Command::new("apt-get")
            .args(["-q", "download", package])
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
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }
}
