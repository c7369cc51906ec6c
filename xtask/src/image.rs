//! `cargo xtask image`: the container image, `FROM scratch` around the static agent
//! (`deploy/Containerfile`), built with `buildah bud --isolation chroot` (offline: no
//! base image to pull).
//!
//! Names: `localhost/weft:<version>-<oci-arch>` per architecture (`amd64`, `arm64`),
//! and `localhost/weft:<version>`, a manifest list of the architectures built, which
//! podman resolves to the host's (`podman run` and `podman kube play` take it). Each
//! per-architecture image is also saved as an OCI archive,
//! `target/image/weft-<version>-<oci-arch>.oci.tar` (`podman load -i` it elsewhere).
//! Builds use `--timestamp 0`: the same binary gives the same image ID.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    arch::Arch,
    build::{self, human},
    exec, setup,
    workspace::Workspace,
};

/// The image repository; tags are the version, optionally suffixed by the OCI arch.
pub const REPOSITORY: &str = "localhost/weft";

/// Set by `cargo xtask test` for the integration tests: the image's name
/// (`localhost/weft:<version>`, the manifest list).
pub const IMAGE_ENV: &str = "WEFT_IMAGE";

/// The containers.conf podman and buildah need here (see [`containers_conf`]).
const CONTAINERS_CONF: &str = "\
# Written by `cargo xtask image`. No default rlimits: podman's (nofile 1048576) exceed
# what root may set without CAP_SYS_RESOURCE on some hosts. runc: crun refuses hybrid
# cgroup hierarchies.
[containers]
default_ulimits = []

[engine]
runtime = \"runc\"
";

/// Options of `cargo xtask image`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which architectures to build: x86_64 (amd64), arm64 (aarch64) or all.
    #[arg(long, default_value = "all", value_parser = parse_arches)]
    pub arch: Arches,
}

/// The architectures of `--arch`.
#[derive(Debug, Clone)]
pub struct Arches(pub Vec<Arch>);

fn parse_arches(text: &str) -> Result<Arches> {
    if text == "all" {
        return Ok(Arches(Arch::ALL.to_vec()));
    }
    Arch::from_name(text).map(|arch| Arches(vec![arch]))
}

/// One built image.
#[derive(Debug)]
pub struct Image {
    /// Its architecture.
    pub arch: Arch,
    /// `localhost/weft:<version>-<oci-arch>`.
    pub tag: String,
    /// The OCI archive it was saved to.
    pub archive: PathBuf,
}

/// `cargo xtask image`: setup, the static agents, the images, the manifest list, and
/// the self-check of the host's image.
pub fn run(ws: &Workspace, args: &Args) -> Result<()> {
    setup::run(ws, setup::Mode::Quiet)?;
    build_all(ws, &args.arch.0).map(drop)
}

/// Builds the images of `arches` (static agents first), tags the manifest list
/// `localhost/weft:<version>`, and checks that the host architecture's image runs
/// (`--version`). Returns the manifest list's name. Needs root (podman's and buildah's
/// storage); expects setup's other steps (bpf-linker) done.
pub fn build_all(ws: &Workspace, arches: &[Arch]) -> Result<String> {
    ensure!(!arches.is_empty(), "no architecture to build an image for");
    setup::image_tools()?;
    let version = version(ws)?;
    let conf = containers_conf(ws)?;
    let mut images = Vec::new();
    for &arch in arches {
        let agent = build::build_static(ws, arch, false)?;
        images.push(build_one(ws, &conf, &version, arch, &agent)?);
    }
    let list = format!("{REPOSITORY}:{version}");
    manifest_list(&conf, &list, &images)?;
    let host = Arch::host()?;
    if arches.contains(&host) {
        self_check(&conf, &list, &version)?;
    } else {
        eprintln!("image: no {host} image built; not running one");
    }
    for image in &images {
        eprintln!(
            "image: {} ({} uncompressed; OCI archive {}, {})",
            image.tag,
            human(image_size(&conf, &image.tag)?),
            image.archive.display(),
            human(
                fs::metadata(&image.archive)
                    .with_context(|| format!("reading {}", image.archive.display()))?
                    .len()
            )
        );
    }
    eprintln!(
        "image: {list}: manifest list of {}",
        images
            .iter()
            .map(|image| image.arch.oci())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(list)
}

/// The workspace version (`[workspace.package] version` of the root `Cargo.toml`),
/// which is the agent's `--version` and the image tag.
pub fn version(ws: &Workspace) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        workspace: WorkspaceTable,
    }
    #[derive(serde::Deserialize)]
    struct WorkspaceTable {
        package: Package,
    }
    #[derive(serde::Deserialize)]
    struct Package {
        version: String,
    }
    let path = ws.root.join("Cargo.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: Manifest =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(manifest.workspace.package.version)
}

/// Writes `target/image/containers.conf` (no default ulimits, runtime runc) and
/// returns its path, for `CONTAINERS_CONF` of podman and buildah.
pub fn containers_conf(ws: &Workspace) -> Result<PathBuf> {
    let dir = ws.target_dir.join("image");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("containers.conf");
    fs::write(&path, CONTAINERS_CONF).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `program` (podman or buildah) with `CONTAINERS_CONF` set.
fn tool(program: &str, conf: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("CONTAINERS_CONF", conf).stdin(Stdio::null());
    cmd
}

/// Builds `localhost/weft:<version>-<oci-arch>` from `deploy/Containerfile` and a
/// context holding only the agent, saves it as an OCI archive, and removes the image
/// the tag named before, if it was another and nothing else uses it.
fn build_one(
    ws: &Workspace,
    conf: &Path,
    version: &str,
    arch: Arch,
    agent: &Path,
) -> Result<Image> {
    let dir = ws.target_dir.join("image");
    let context = dir.join(format!("context-{}", arch.oci()));
    if context.exists() {
        fs::remove_dir_all(&context).with_context(|| format!("removing {}", context.display()))?;
    }
    fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    let binary = context.join(format!("weft-{}", arch.oci()));
    fs::copy(agent, &binary)
        .with_context(|| format!("copying {} to {}", agent.display(), binary.display()))?;
    let tag = format!("{REPOSITORY}:{version}-{}", arch.oci());
    let before = image_id(conf, &tag)?;
    exec::run(
        tool("buildah", conf)
            .args(["bud", "--isolation", "chroot", "--timestamp", "0"])
            .args(["--platform", &format!("linux/{}", arch.oci())])
            .args(["--label", "org.opencontainers.image.title=weft"])
            .args([
                "--label",
                &format!("org.opencontainers.image.version={version}"),
            ])
            .args(["--tag", &tag, "--file"])
            .arg(ws.root.join("deploy").join("Containerfile"))
            .arg(&context),
    )?;
    fs::remove_dir_all(&context).with_context(|| format!("removing {}", context.display()))?;
    let after = image_id(conf, &tag)?.with_context(|| format!("buildah made no image {tag}"))?;
    if let Some(old) = before.filter(|old| *old != after) {
        // Fails (and is left alone) while another tag or a container still uses it.
        let _ = tool("podman", conf)
            .args(["rmi", &old])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let archive = dir.join(format!("weft-{version}-{}.oci.tar", arch.oci()));
    if archive.exists() {
        fs::remove_file(&archive).with_context(|| format!("removing {}", archive.display()))?;
    }
    exec::run(tool("buildah", conf).args([
        "push",
        "--quiet",
        &tag,
        &format!("oci-archive:{}:{tag}", archive.display()),
    ]))?;
    Ok(Image { arch, tag, archive })
}

/// (Re)creates the manifest list `list` holding `images`.
fn manifest_list(conf: &Path, list: &str, images: &[Image]) -> Result<()> {
    let exists = tool("podman", conf)
        .args(["manifest", "exists", list])
        .status()
        .context("could not run podman")?
        .success();
    if exists {
        exec::run(tool("buildah", conf).args(["manifest", "rm", list]))?;
    }
    exec::run(tool("buildah", conf).args(["manifest", "create", list]))?;
    for image in images {
        exec::run(tool("buildah", conf).args([
            "manifest",
            "add",
            list,
            &format!("containers-storage:{}", image.tag),
        ]))?;
    }
    Ok(())
}

/// `podman run --rm --network none <image> --version` must print `weft <version>`.
fn self_check(conf: &Path, image: &str, version: &str) -> Result<()> {
    let out = exec::output(tool("podman", conf).args([
        "run",
        "--rm",
        "--network",
        "none",
        image,
        "--version",
    ]))?;
    let want = format!("weft {version}");
    if out.trim() != want {
        bail!(
            "`podman run {image} --version` printed `{}`, expected `{want}`",
            out.trim()
        );
    }
    eprintln!("image: {image} runs: {want}");
    Ok(())
}

/// The ID of the image (or manifest list) `name`, or `None` if there is none.
fn image_id(conf: &Path, name: &str) -> Result<Option<String>> {
    let out = tool("podman", conf)
        .args(["image", "inspect", "--format", "{{.Id}}", name])
        .stderr(Stdio::null())
        .output()
        .context("could not run podman")?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok((out.status.success() && !id.is_empty()).then_some(id))
}

/// The uncompressed size podman reports for `image`.
fn image_size(conf: &Path, image: &str) -> Result<u64> {
    let out = exec::output(tool("podman", conf).args([
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        image,
    ]))?;
    out.trim()
        .parse()
        .with_context(|| format!("podman reported the size of {image} as `{}`", out.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_option() {
        assert_eq!(parse_arches("all").unwrap().0, Arch::ALL);
        assert_eq!(parse_arches("arm64").unwrap().0, [Arch::Aarch64]);
        assert_eq!(parse_arches("x86_64").unwrap().0, [Arch::X86_64]);
        assert!(parse_arches("mips").is_err());
    }

    #[test]
    fn version_is_the_workspace_version() {
        let ws = Workspace::locate().unwrap();
        let v = version(&ws).unwrap();
        assert!(v.split('.').count() == 3, "{v}");
    }
}
