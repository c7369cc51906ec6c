//! The agent's peers file (TOML), written from testbed hosts.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};

use crate::Host;

/// Renders the peers file for `hosts`: one `[[peer]]` table per host with its
/// PeerName, nickname, ShortID and underlay address.
pub fn peers_toml<'a>(hosts: impl IntoIterator<Item = &'a Host>) -> String {
    let mut s = String::new();
    for h in hosts {
        let _ = write!(
            s,
            "[[peer]]\nname = \"{}\"\nnickname = \"{}\"\nshort_id = {}\naddress = \"{}\"\n\n",
            h.peer_name(),
            h.nickname(),
            h.short_id(),
            h.addr
        );
    }
    s
}

/// Writes the peers file for `hosts` to `path` (atomically: a temporary file renamed
/// over it, so an agent reloading on SIGHUP never reads half a file).
pub fn write_peers_file<'a>(path: &Path, hosts: impl IntoIterator<Item = &'a Host>) -> Result<()> {
    write_atomic(path, &peers_toml(hosts))
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_matches_the_contract() {
        let hosts = [Host::new("x", 1), Host::new("x", 12)];
        assert_eq!(
            peers_toml(&hosts),
            "[[peer]]\nname = \"aa:00:00:00:00:01\"\nnickname = \"host1\"\nshort_id = 1\n\
             address = \"192.168.48.11\"\n\n[[peer]]\nname = \"aa:00:00:00:00:0c\"\n\
             nickname = \"host12\"\nshort_id = 12\naddress = \"192.168.48.22\"\n\n"
        );
    }
}
